"""Benchmark of covpool's matrix roots and layers: ``python -m covpool.bench`` (``--help`` for the flags).

What is measured
    Matrix roots (default): every configuration of :data:`covpool.bench.configs.CONFIGS` (covpool's
    methods and settings, and the peers ``eigh-autograd`` and ``torch.linalg.matrix_sqrth``) on batches
    of ``random_spd(batch, n=n, condition=...)`` matrices (geometric spectrum from 1 to 1/condition),
    for ``sqrtm`` and ``inv_sqrtm``. Layers (``--layers``): covpool's heads and ZCA batch norm at typical
    sizes, each with several root methods. ``--compile``: the compile time of a conv + CovPoolHead model
    and its frames, graphs and graph breaks (:mod:`covpool.bench.compile`). ``--host``: the host time of
    eager calls, operators per call and the options and plan's share (:mod:`covpool.bench.host`).

How to read the table (also ``roots.csv`` / ``roots.json`` / ``layers.csv`` / ``layers.json``)
    The table has one block per comparison (function, device, dtype, n, batch; or layer, device,
    dtype), headed ``ranked`` or ``NOT RANKABLE`` with why (:mod:`covpool.bench.ranking`).
    runs
        the method a configuration runs there (``auto`` resolved, e.g. ``eigh`` on CPU).
    forward ms, forward+backward ms (``forward_ms``, ``forward_min_ms``, ``forward_max_ms``, ...)
        min / median / max wall time of a forward under ``no_grad``, and of a forward plus the backward
        of a fixed random upstream gradient (CUDA synchronised), the repeats of the configurations of a
        comparison interleaved round-robin. Compare only within one comparison.
    spread, rank
        the larger ``max / min`` of the two times; the rank on forward+backward time, 1 + the
        configurations faster in every run, none where the comparison is not rankable.
    saved_mib
        MiB that autograd keeps between forward and backward (inputs and weights not counted). Methods
        with their own backward (eigh, mpa, mtp, paper) keep one or two ``n × n`` matrices per sample;
        ``ns`` keeps every intermediate of its iterations.
    peak_mib
        CUDA only: peak allocation of one forward+backward above what was allocated before it.
    forward_error, gradient_error
        largest relative Frobenius error over 8 matrices (``--error-batch``) against float64
        eigendecomposition references (:mod:`covpool.testing`); the gradient is ``∂⟨G, A^(±1/2)⟩/∂A``.
        They do not depend on the batch size.
    note
        why a cell has no numbers (out of memory, an unsupported dtype, the time budget spent, ...).

How to read the figures (``pareto_<device>_<dtype>_n<n>.png``)
    One panel per function and batch size; each point is a configuration (named in the legend) at its
    gradient error (x) and median forward+backward time (y, bar from min to max), log-log: down and
    left is better. The dashed staircase joins the Pareto front (ringed points): the configurations that
    no other is both faster and more accurate than; a panel that is not rankable has none, and cells
    without a point are listed in their panel.
    Pick the fastest point left of the error your model tolerates; ``eigh`` shows what an exact
    method reaches in the dtype.

This measures covpool on the machine it runs on. The studies that derived the library's constants
(rounding of the float32 gradients, the TF32 plan's fitted model, mixed-precision configurations, inputs
beyond the assumed bound) are scripts in the repository, ``examples/studies/``, not part of the package.

Comparisons run from small to large sizes. ``--time-budget`` is soft: once it is spent no new
comparison starts (a started one finishes), and every cell left out is still a row, with the reason,
and listed under ``MISSING:``.
"""

from covpool.bench.configs import CONFIGS, RootConfig
from covpool.bench.grid import Cell, plan_grid, run_grid
from covpool.bench.layers import LAYER_CASES, LAYER_METHODS, run_layers
from covpool.bench.timing import Measurement, measure

__all__ = [
    "CONFIGS",
    "LAYER_CASES",
    "LAYER_METHODS",
    "Cell",
    "Measurement",
    "RootConfig",
    "measure",
    "plan_grid",
    "run_grid",
    "run_layers",
]
