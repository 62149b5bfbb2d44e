"""Public matrix-root functions :func:`sqrtm` and :func:`inv_sqrtm`, and the autograd glue.

``"mpa"`` and ``"mtp"`` run their forward without a graph and differentiate by the Lyapunov solver
(:mod:`covpool.linalg.lyapunov`), so the backward stores only ``S``, ``S⁻¹`` and a scale per matrix,
whatever the number of steps. ``"ns"`` differentiates through its iterations with autograd, as
iSQRT-COV does. ``"eigh"`` is exact (:mod:`covpool.linalg.eigh`). ``"auto"`` picks one of them by the rules
in :mod:`covpool.linalg.auto`.
"""

from __future__ import annotations

from typing import TypedDict, Unpack

import torch
from torch.autograd.function import once_differentiable

from covpool.linalg.auto import choose_method
from covpool.linalg.checks import check_choice, check_square_batch
from covpool.linalg.eigh import eigh_root
from covpool.linalg.iteration import coupled_root, direct_root
from covpool.linalg.lyapunov import solve_lyapunov
from covpool.linalg.normalization import spectral_scale
from covpool.linalg.options import METHODS, RootOptions, resolve_options

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _normalised(A: torch.Tensor, options: RootOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Â, c)`` with ``Â = A / c`` and ``c ≈ λmax(A)``. Shapes ``(*, n, n)``, ``(*, 1, 1)``."""
    scale = spectral_scale(A, options.normalization)
    return A / scale, scale


def _with_ridge(A: torch.Tensor, eps: float) -> torch.Tensor:
    """``A + eps (tr(A) / n) I``, differentiable, so every method gets the ridge's exact gradient."""
    if eps == 0.0:
        return A
    mean_eigenvalue = A.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
    return A + eps * mean_eigenvalue * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)


def _series_forward(
    A: torch.Tensor, options: RootOptions, inverse: bool, check: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(S, S⁻¹ or None, c)`` by the series method in ``options``; ``S⁻¹`` is None only for a direct sqrt."""
    A_hat, scale = _normalised(A, options)
    if options.steps == 1:
        root = direct_root(A_hat, series=options.series, degree=options.degree, inverse=inverse, check=check)
        Y, Z = (A_hat @ root, root) if inverse else (root, None)
    else:
        Y, Z = coupled_root(
            A_hat, series=options.series, degree=options.degree, steps=options.steps, check=check
        )
    root_scale = scale.sqrt()
    return Y * root_scale, None if Z is None else Z / root_scale, scale


class SeriesRoot(torch.autograd.Function):
    """``A^(±1/2)`` by MPA/MTP in the forward and the Lyapunov equation in the backward."""

    @staticmethod
    def forward(ctx, A: torch.Tensor, inverse: bool, options: RootOptions, check: bool) -> torch.Tensor:  # noqa: D102
        S, S_inverse, scale = _series_forward(A, options, inverse, check)
        ctx.save_for_backward(S, S_inverse, scale)
        ctx.inverse = inverse
        ctx.options = options
        return S_inverse if inverse else S

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        S, S_inverse, scale = ctx.saved_tensors
        options: RootOptions = ctx.options
        G = 0.5 * (grad + grad.mT)
        if ctx.inverse:
            # d(S⁻¹) = -S⁻¹ dS S⁻¹, so the right-hand side for dS is -S⁻¹ G S⁻¹.
            G = -S_inverse @ G @ S_inverse
        X = solve_lyapunov(
            S,
            G,
            scale=scale.sqrt(),
            iters=options.backward_iters,
            tol=options.backward_tol,
            S_inverse=S_inverse if options.backward_newton else None,
        )
        return X, None, None, None


def _newton_schulz(A: torch.Tensor, options: RootOptions, inverse: bool) -> torch.Tensor:
    """iSQRT-COV: coupled Newton-Schulz on ``A / c``, differentiated by autograd through every step."""
    A_hat, scale = _normalised(A, options)
    Y, Z = coupled_root(A_hat, series="taylor", degree=options.degree, steps=options.steps)
    return Z * scale.rsqrt() if inverse else Y * scale.sqrt()


class RootOptionsKwargs(TypedDict, total=False):
    """Keyword options of :func:`sqrtm` and :func:`inv_sqrtm` (documented there)."""

    method: str
    tol: float
    degree: int | None
    steps: int | None
    normalization: str | None
    eps: float
    backward_iters: int
    backward_tol: float | None
    backward_newton: bool
    check_input: bool


def _root(
    A: torch.Tensor,
    *,
    inverse: bool,
    method: str = "auto",
    tol: float = 1e-3,
    degree: int | None = None,
    steps: int | None = None,
    normalization: str | None = None,
    eps: float = 0.0,
    backward_iters: int = 20,
    backward_tol: float | None = 1e-5,
    backward_newton: bool = True,
    check_input: bool = True,
) -> torch.Tensor:
    check_choice(method, "method", METHODS)
    if not tol > 0:
        raise ValueError(f"tol must be a float > 0, got {tol!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    if check_input:
        check_square_batch(A)
    work_dtype = torch.float32 if A.dtype in _LOW_PRECISION else A.dtype
    if method == "auto":
        method = choose_method(A.device, tol, A.shape[-1], A[..., 0, 0].numel())
    options = resolve_options(
        method,
        degree=degree,
        steps=steps,
        normalization=normalization,
        backward_iters=backward_iters,
        backward_tol=backward_tol,
        backward_newton=backward_newton,
    )
    with torch.autocast(device_type=A.device.type, enabled=False):
        A_work = A.to(work_dtype)
        A_work = _with_ridge(0.5 * (A_work + A_work.mT), eps)
        if options.method == "eigh":
            out = eigh_root(A_work, inverse=inverse)
        elif options.method == "ns":
            out = _newton_schulz(A_work, options, inverse)
        else:
            out = SeriesRoot.apply(A_work, inverse, options, check_input)
    return out.to(A.dtype)


_DOC = """{summary}

    Args:
        A: ``(*, n, n)`` symmetric positive {definite} matrices, any number of leading batch dimensions.
            Only the symmetric part ``(A + Aᵀ) / 2`` is used. float16/bfloat16 are computed in float32
            and returned in their own dtype; autocast is disabled inside.

    Keyword options (all optional):
        method: ``"auto"`` (default) picks the fastest method that meets ``tol`` for the device, size and
            batch (rules in :mod:`covpool.linalg.auto`); ``"mpa"``: coupled Padé iteration with a Lyapunov
            backward; ``"mtp"``: coupled Taylor iteration with a Lyapunov backward; ``"ns"``: iSQRT-COV's
            Newton-Schulz with autograd; ``"eigh"``: exact eigendecomposition, Daleckii-Krein backward.
        tol: relative error that ``"auto"`` must meet (default 1e-3).
        degree: degree of the Padé [degree/degree] (mpa) or Taylor (mtp) step; default 2 (mpa), 8 (mtp),
            1 (ns).
        steps: number of coupled steps; 1 gives the paper's single approximant. Default 4 (mpa, mtp),
            5 (ns).
        normalization: how ``A`` is scaled first, ``"power"`` (default: power-iteration estimate of
            ``λmax``), ``"frobenius"`` (the paper's) or ``"trace"`` (iSQRT-COV's, the default of ns).
        eps: relative ridge: the root of ``A + eps · (tr(A) / n) · I`` is returned, with the exact
            gradient of that regularised function. Use it for rank-deficient covariances (e.g. 1e-4, the
            covariance heads' default); default 0.
        backward_iters: maximum Newton-Schulz iterations of the Lyapunov backward (mpa, mtp); default 20.
        backward_tol: stop the backward once the RMS entry of ``B² - I`` is below it (default 1e-5;
            ``None``: always ``backward_iters``, no host synchronisation).
        backward_newton: start the backward with one scaled Newton step that reuses the forward's
            inverse root (default True; halves the iterations on ill-conditioned input).
        check_input: validate ``A`` (type, shape, dtype, finiteness) and that the Padé denominators stay
            positive definite (host syncs; default True). Turn off in hot loops and under
            ``torch.compile``; the options are always validated.

    Returns:
        ``(*, n, n)`` tensor of ``A``'s dtype.

    The paper's configuration is ``{name}(A, **covpool.PAPER_CONFIG)``.

    Example:
        >>> import torch, covpool
        >>> A = covpool.testing.random_spd(4, n=8, dtype=torch.float32)
        >>> {name}(A, method="mpa").shape
        torch.Size([4, 8, 8])
    """


def sqrtm(A: torch.Tensor, **options: Unpack[RootOptionsKwargs]) -> torch.Tensor:
    return _root(A, inverse=False, **options)


def inv_sqrtm(A: torch.Tensor, **options: Unpack[RootOptionsKwargs]) -> torch.Tensor:
    return _root(A, inverse=True, **options)


sqrtm.__doc__ = _DOC.format(
    summary="Principal square root ``A^(1/2)`` of symmetric positive semi-definite matrices.",
    definite="semi-definite",
    name="sqrtm",
)
inv_sqrtm.__doc__ = _DOC.format(
    summary="Inverse principal square root ``A^(-1/2)`` of symmetric positive definite matrices.",
    definite="definite",
    name="inv_sqrtm",
)
