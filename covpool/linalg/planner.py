"""Which code runs for a call of :func:`covpool.sqrtm` / :func:`covpool.inv_sqrtm`: one planner decides it.

:func:`plan_root` turns the options and what is known of the input on the host (size, working dtype, device,
whether it is traced, whether its tensors are real) into a :class:`RootPlan`, and the roots only execute
that plan (:mod:`covpool.linalg.runner`). Every decision is taken here, in this order:

=====================  ====================================================================================
decision               rule
=====================  ====================================================================================
opaque operator        while ``torch.compile``/``torch.export`` trace and torch's float32 matmul setting is
                       reduced (TF32, bfloat16) or ``precision="tf32"``: the root enters the graph as the
                       ``covpool::root`` operator, which plans again when it runs
                       (:mod:`covpool.linalg.opaque`)
method                 ``"auto"``: ``"mtp"`` while tracing (a graph of products, exports to ONNX);
                       ``"eigh"`` off CUDA (:data:`AUTO_METHOD`); on CUDA ``"mtp"``, or ``"eigh"`` below
                       the accuracy the matmul methods are relied on for (:data:`MATMUL_FLOOR`)
``tol`` floor          mtp/mpa refuse ``tol`` below :data:`TOL_FLOOR` machine epsilons
precision              ``"full"`` unless mtp and ``precision`` is ``"tf32"``; ``"auto"`` takes ``"tf32"``
                       on float32 CUDA matrices, not traced, where that plan is certified and modelled
                       faster (:func:`modelled_time`)
schedules              :func:`covpool.linalg.certify.certify`: normalisation, gradient, certified steps
fallback to eigh       ``method="auto"`` (not traced) takes ``"eigh"`` where mtp's plan refuses ``tol``
fused kernels          ``fused=True``, real float32 CUDA tensors, ``n <=``
                       :data:`covpool.kernels.MAX_N`, a Lyapunov gradient at ``"full"`` precision, not
                       traced, Triton importable, and a schedule the kernel runs (checked per direction)
host checks            ``check_input`` (default: read values where it needs no sync, i.e. off CUDA and
                       outside tracing; :func:`covpool.checks.reads_values`)
decomposition          ``method="auto"`` taking eigh off CUDA, not traced: each float32 matrix is
                       decomposed in float32 where its own eigenvalues certify ``tol``, else in float64
                       (:mod:`covpool.linalg.eigh`); ``method="eigh"``: float64 for every matrix
=====================  ====================================================================================

The gradient a plan runs (``RootPlan.gradient``) is named by :data:`covpool.linalg.certify.GRADIENTS`, the one
mapping from the options' ``backward``. Plans are resolved once per distinct arguments and cached, refusals
included.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch._subclasses.fake_tensor import is_fake

from covpool.checks import reads_values
from covpool.linalg.certify import Schedules, certify
from covpool.linalg.iteration import MIXED_TEST_PRODUCTS, RESIDUAL_TEST_PRODUCTS
from covpool.linalg.mixed import MixedPlan
from covpool.linalg.options import DEFAULT_TOL, OPTION_FIELDS, RootOptions
from covpool.linalg.precision import reduced
from covpool.linalg.schedule import ResidualTest, Schedule
from covpool.numerics import is_tracing, working_dtype

AUTO_METHOD = {"cuda": "mtp"}
"""``method="auto"`` per device type, before the floor and the fallback; any other device takes
``"eigh"``: on CPU LAPACK's eigensolver with the Daleckii-Krein backward is the fastest accurate root (a
CPU product is not launch-bound; measured by ``covpool-bench``, recorded in
``examples/results/roots_cpu_2core.csv``, and for the layers by ``covpool-bench --layers`` in
``examples/results/layers_cpu_2core.csv``). On CUDA
``"mtp"`` is products only and never synchronises, where ``torch.linalg.eigh`` synchronises to check its
result."""
MATMUL_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5}
"""Smallest relative error ``method="auto"`` relies on the matmul methods for, per working dtype."""
TOL_FLOOR = 8
"""Smallest ``tol`` mtp/mpa accept, in machine epsilons of the working dtype (9.5e-7 in float32, 1.8e-15 in
float64): below it the products' rounding, not the schedule, sets the error."""
TF32_PRODUCT_TIME = {32: 1.03, 64: 0.93, 128: 0.56, 256: 0.37, 512: 0.20}
"""Time of one batched TF32 product relative to a float32 one, by ``n``: batch 64 on an H200, torch 2.11,
from ``python -m covpool.bench.cuda_report`` (its product-floor section; recorded in
``examples/results/cuda_report_h200.json``)."""


@dataclass(frozen=True)
class RootPlan:
    """How one call is computed: every decision of :func:`plan_root`.

    Attributes:
        method: ``"mtp"``, ``"mpa"``, ``"ns"``, ``"eigh"``, or ``"opaque"`` (the call enters a traced graph
            as the ``covpool::root`` operator, which plans again when it runs).
        precision: the precision of the products the schedules are certified for, ``"full"`` or
            ``"tf32"`` (:mod:`covpool.linalg.precision`).
        read_values: read validity flags on the host and raise (``check_input`` resolved).
        fused_forward: the forward iteration runs in the fused Triton kernel
            (:mod:`covpool.kernels.fused_iteration`).
        fused_backward: the Lyapunov solve runs in the fused Triton kernel
            (:mod:`covpool.kernels.fused_lyapunov`).
        decomposition_tol: eigh only: decompose float32 matrices in float32 where their eigenvalues
            certify this ``tol``, the others in float64 (:func:`covpool.linalg.eigh.eigh_root`); None:
            every float32 matrix in float64.
        gradient: how the backward runs (:data:`covpool.linalg.certify.GRADIENTS`): ``"lyapunov"``,
            ``"adjoint"``, ``"autograd"``, ``"eigh"`` or ``"opaque"``.
        normalization: how ``A`` is scaled before an iteration (None for eigh).
        forward: schedule of the coupled iteration (None for eigh and for a single approximant).
        direct_degree: degree of the paper's single approximant when ``steps == 1``, else None.
        series: that approximant's series, ``"taylor"`` (mtp) or ``"pade"`` (mpa), else None. A field,
            not a property: traced code reads only fields of the plan (dynamo cannot call a property of
            the constant plan an autograd function is passed).
        backward: schedule of the Lyapunov sign iteration (mtp and mpa), else None (see ``gradient``).
        lower: assumed lower end of the spectrum of ``Â^(1/2)``.
        check: the a-posteriori test of every result (mtp and mpa iterations; None for the single
            approximant, ns and eigh, which have checks of their own).
        mixed: the mixed-precision plan that a ``"tf32"`` plan runs instead of ``forward`` and ``backward``
            (:mod:`covpool.linalg.mixed`; ``forward`` and ``backward`` then hold its two schedules), else
            None.
    """

    method: str
    precision: str
    read_values: bool
    fused_forward: bool
    fused_backward: bool
    decomposition_tol: float | None
    gradient: str
    normalization: str | None
    forward: Schedule | None
    direct_degree: int | None
    series: str | None
    backward: Schedule | None
    lower: float
    check: ResidualTest | None
    mixed: MixedPlan | None

    def products(self) -> int | None:
        """Matrix products of forward and backward as planned, without the normalisation's (two for the
        Schatten-8 norm, none for the trace) and the residual test's (three; eight for a mixed plan); None
        where autograd or eigh differentiates. A mixed plan's low-precision and float32 products together
        (:meth:`covpool.linalg.mixed.MixedPlan.products` has them apart)."""
        if self.mixed is not None:
            return sum(self.mixed.products())
        if self.gradient == "lyapunov":
            forward = self.forward.forward_products() if self.forward is not None else 0
            return forward + self.backward.backward_products()
        if self.gradient == "adjoint":
            return self.forward.forward_products() + self.forward.adjoint_products()
        return None


def _build(
    method: str,
    precision: str,
    read_values: bool,
    schedules: Schedules,
    *,
    fused_forward: bool = False,
    fused_backward: bool = False,
    decomposition_tol: float | None = None,
) -> RootPlan:
    """The one place a :class:`RootPlan` is made: the planner's decisions and the certified schedules."""
    certified = {f.name: getattr(schedules, f.name) for f in fields(Schedules)}
    return RootPlan(
        method=method,
        precision=precision,
        read_values=read_values,
        fused_forward=fused_forward,
        fused_backward=fused_backward,
        decomposition_tol=decomposition_tol,
        **certified,
    )


OPAQUE = _build("opaque", "full", False, Schedules(gradient="opaque"))
"""The plan of a root traced as the ``covpool::root`` operator (:mod:`covpool.linalg.opaque`)."""


def plan_call(options: RootOptions, A: torch.Tensor, eps: float) -> RootPlan:
    """The plan of one call on ``A`` (``(*, n, n)``, any dtype the roots take) with relative ridge ``eps``:
    :func:`plan_root` with the opaque route and the tensors' kind read from ``A``."""
    dtype = working_dtype(A.dtype)
    tracing = is_tracing()
    if tracing and (reduced(dtype) or options.precision == "tf32"):
        return OPAQUE
    real = not (options.fused and A.is_cuda and not tracing and is_fake(A))
    return plan_root(options, A.shape[-1], eps=eps, device=A.device, dtype=dtype, real_tensors=real)


def plan_root(
    options: RootOptions,
    n: int,
    *,
    eps: float,
    device: torch.device,
    dtype: torch.dtype,
    real_tensors: bool = True,
) -> RootPlan:
    """Resolve ``options`` for one call on ``(*, n, n)`` matrices of working dtype ``dtype`` (float32 or
    float64) on ``device``, with relative ridge ``eps``. ``real_tensors=False`` for fake tensors
    (the CUDA path traced on CPU), which take the plain-torch path: a kernel launch needs real memory.

    Raises:
        ValueError: ``tol`` below what products in ``dtype`` can deliver (:data:`TOL_FLOOR`), or no
            schedule certifies it.

    Example:
        >>> import torch, covpool
        >>> plan = plan_root(covpool.RootOptions(), 64, eps=0.0, device=torch.device("cuda"),
        ...                  dtype=torch.float32)
        >>> plan.method, plan.gradient, plan.precision
        ('mtp', 'lyapunov', 'full')
    """
    # The options' values, not the object: dynamo hands an assume_constant_result function a RootOptions
    # built inside the compiled region without its fields.
    values = tuple(getattr(options, name) for name in OPTION_FIELDS)
    tracing = is_tracing()
    key = (values, n, float(eps), device.type, torch.finfo(dtype).eps, dtype == torch.float32, tracing)
    return _cached_plan(*key, real_tensors)


_PLANS: dict[tuple, RootPlan | ValueError] = {}
"""The plans resolved so far, keyed on every argument of :func:`_resolve`, and the refusals (a refused plan
is not searched for again)."""


@torch.compiler.assume_constant_result
def _cached_plan(
    values: tuple,
    n: int,
    eps: float,
    device_type: str,
    unit_roundoff: float,
    float32: bool,
    tracing: bool,
    real_tensors: bool,
) -> RootPlan:
    """:func:`_resolve`, once per distinct arguments (:data:`_PLANS`).

    Marked constant: while tracing, dynamo calls it on the host with the traced call's arguments, which
    it guards (the options' values, size, ridge, dtype), and puts the plan in the graph as a constant.
    The cache is a plain dict rather than ``functools.cache``, whose wrapper dynamo would trace through
    with a warning.
    """
    key = (values, n, eps, device_type, unit_roundoff, float32, tracing, real_tensors)
    if key not in _PLANS:
        try:
            _PLANS[key] = _resolve(RootOptions(**dict(zip(OPTION_FIELDS, values, strict=True))), *key[1:])
        except ValueError as refusal:
            _PLANS[key] = refusal
    plan = _PLANS[key]
    if isinstance(plan, ValueError):
        raise ValueError(str(plan))
    return plan


def _resolve(
    options: RootOptions,
    n: int,
    eps: float,
    device_type: str,
    unit_roundoff: float,
    float32: bool,
    tracing: bool,
    real_tensors: bool,
) -> RootPlan:
    """Every decision of the module docstring's table after the opaque route, in its order."""
    dtype = torch.float32 if float32 else torch.float64
    tol = options.tol or DEFAULT_TOL
    method = options.method
    if method == "auto":
        method = "mtp" if tracing else AUTO_METHOD.get(device_type, "eigh")
        if method == "mtp" and not tracing and tol < MATMUL_FLOOR[dtype]:
            method = "eigh"
    if method in ("mtp", "mpa") and options.tol is not None and options.tol < TOL_FLOOR * unit_roundoff:
        raise ValueError(
            f"tol={options.tol:g} is below what {dtype} products can deliver (the rounding of the products "
            f"alone is about {TOL_FLOOR} x {unit_roundoff:.2g} = {TOL_FLOOR * unit_roundoff:.2g}); pass "
            f"tol >= {TOL_FLOOR * unit_roundoff:.2g}" + (", or float64 input" if float32 else "")
        )
    read_values = reads_values(options.check_input, torch.device(device_type))
    precision, schedules = "full", None
    if method == "mtp" and options.precision == "tf32":
        precision = "tf32"
    elif (
        method == "mtp" and options.precision == "auto" and device_type == "cuda" and float32 and not tracing
    ):
        try:  # the mixed plan where it is certified and modelled faster
            mixed = certify(options, method, n, eps, unit_roundoff, "tf32")
            full = certify(options, method, n, eps, unit_roundoff, "full")
        except ValueError:
            pass
        else:
            low, high = mixed.mixed.products()
            full_products = _build(method, "full", read_values, full).products()
            if modelled_time(low, high + MIXED_TEST_PRODUCTS, n) < full_products + RESIDUAL_TEST_PRODUCTS:
                return _build(method, "tf32", read_values, mixed)
            schedules = full  # certified already: not searched for again below
    try:
        schedules = schedules or certify(options, method, n, eps, unit_roundoff, precision)
    except ValueError:
        if options.method != "auto" or method == "eigh" or tracing:
            raise
        method, precision = "eigh", "full"  # auto takes the exact path where the iteration refuses tol
        schedules = certify(options, method, n, eps, unit_roundoff, precision)
    fused_forward, fused_backward, schedules = _fused(
        options, method, schedules, n, eps, device_type, float32, tracing, real_tensors
    )
    per_matrix = method == "eigh" and options.method == "auto" and device_type != "cuda" and not tracing
    return _build(
        method,
        precision,
        read_values,
        schedules,
        fused_forward=fused_forward,
        fused_backward=fused_backward,
        decomposition_tol=tol if per_matrix else None,
    )


def _fused(
    options: RootOptions,
    method: str,
    schedules: Schedules,
    n: int,
    eps: float,
    device_type: str,
    float32: bool,
    tracing: bool,
    real_tensors: bool,
) -> tuple[bool, bool, Schedules]:
    """Whether the forward iteration and the Lyapunov solve run in the fused kernels, and the schedules
    the call runs; the kernels' modules are imported only where the other conditions hold.

    The kernels form their products in split TF32 (:data:`covpool.kernels.fused_iteration.INPUT_PRECISION`),
    so a fused call runs schedules certified at :data:`covpool.kernels.fused_iteration.SPLIT_EPSILON`:
    certified again there, and left to the reference (``schedules``, float32) where that certificate
    refuses ``tol`` or no longer gives schedules the kernels run."""
    off = False, False, schedules
    if not (
        options.fused
        and device_type == "cuda"
        and real_tensors
        and float32
        and schedules.gradient == "lyapunov"
        and schedules.mixed is None
        and not tracing
    ):
        return off
    from covpool import kernels

    if n > kernels.MAX_N or not kernels.triton_available():
        return off
    from covpool.kernels import fused_iteration, fused_lyapunov

    try:
        split = certify(options, method, n, eps, fused_iteration.SPLIT_EPSILON, "full")
    except ValueError:
        return off
    if split.gradient != "lyapunov" or split.mixed is not None:
        return off
    forward = split.forward is not None and fused_iteration.schedule_in_kernel(split.forward)
    backward = fused_lyapunov.schedule_in_kernel(split.backward)
    return (forward, backward, split) if forward or backward else off


def modelled_time(low: int, full: int, n: int) -> float:
    """Time of ``low`` TF32 and ``full`` float32 products of size ``n``, in float32 products
    (:data:`TF32_PRODUCT_TIME`; sizes in between take the figure of the next smaller size listed)."""
    ratio = TF32_PRODUCT_TIME[max((size for size in TF32_PRODUCT_TIME if size <= n), default=32)]
    return low * ratio + full
