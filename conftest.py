"""Collection of the package's modules (``--doctest-modules``): the Triton kernels' modules
(``covpool/kernels/triton_*.py``) import Triton at their top, and CPU builds of torch come without it."""

from __future__ import annotations

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("triton") else ["covpool/kernels/triton_*.py"]
