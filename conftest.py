"""Collection of the package's modules (``--doctest-modules``): the Triton kernels' module imports Triton at
its top, and CPU builds of torch come without it."""

from __future__ import annotations

import importlib.util

collect_ignore = [] if importlib.util.find_spec("triton") else ["covpool/kernels/triton_iteration.py"]
