"""Runs a :class:`covpool.linalg.planner.RootPlan`: the autograd functions of the roots and their checks.

``"mpa"`` and ``"mtp"`` run their forward without a graph and differentiate by the Lyapunov solver
(:mod:`covpool.linalg.lyapunov`), so the backward stores only ``Y ≈ Â^(1/2)`` (and ``Z ≈ Â^(-1/2)`` for the
inverse root) and a scale per matrix, whatever the number of steps; with the gradient ``"adjoint"`` they
are differentiated through their steps instead. ``"ns"`` always is, by autograd, as iSQRT-COV does.
``"eigh"`` is exact (:mod:`covpool.linalg.eigh`). What is checked where is said in :mod:`covpool.checks`.
Nothing here decides: every branch reads a field of the plan, and the fused kernels' modules are imported
only by a plan that runs them.
"""

from __future__ import annotations

import functools

import torch

from covpool.checks import check_finite, estimated_condition, raise_if_invalid, refuse_double_backward
from covpool.linalg.eigh import eigh_root
from covpool.linalg.flags import count_flagged
from covpool.linalg.iteration import coupled_root, direct_root, passes_residual_test, within_error
from covpool.linalg.lyapunov import solve_lyapunov
from covpool.linalg.mixed import mixed_lyapunov, mixed_sqrt
from covpool.linalg.normalization import normalise
from covpool.linalg.options import DEFAULT_CONDITION, DEFAULT_TOL, RootOptions
from covpool.linalg.planner import RootPlan
from covpool.linalg.precision import products_in, scoped_backward, tf32_products
from covpool.linalg.unrolled import coupled_root_adjoint
from covpool.numerics import symmetrize, with_relative_ridge, working_dtype

NS_DIVERGED = 1.0
"""ns's test of gross failure (:func:`covpool.linalg.iteration.within_error`): a few Newton-Schulz steps
are far from converged on ill-conditioned input by design, so only divergence is caught."""


class MatmulRoot(torch.autograd.Function):
    """``f(sym(A) + ridge)`` with ``f = (·)^(±1/2)`` by a coupled iteration (mtp, mpa); Lyapunov backward,
    or (``plan.gradient == "adjoint"``) the fused reverse mode of the polynomial steps.

    Symmetrisation and ridge sit inside, so that their adjoint costs nothing extra: the Lyapunov solution
    ``X`` is symmetric, and the ridge adds ``(eps / n) tr(X) I``. The normalising scale ``c`` is held
    constant in both backwards (the exact root is homogeneous, so its gradient through ``c`` vanishes).
    Returns the root and a per-matrix validity flag (``(*,)`` bool, not differentiable): whether the
    matrix passes the plan's residual test (:class:`covpool.linalg.schedule.ResidualTest`), which
    certifies forward and gradient within ``tol`` wherever the spectrum lies; a matrix that fails gets
    NaN. Both directions run their products at the plan's precision (:mod:`covpool.linalg.precision`).
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx, A: torch.Tensor, inverse: bool, plan: RootPlan, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with products_in(plan.precision, A.dtype):
            return MatmulRoot._forward(ctx, A, inverse, plan, eps)

    @staticmethod
    def _forward(
        ctx, A: torch.Tensor, inverse: bool, plan: RootPlan, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        A_hat, scale = normalise(with_relative_ridge(symmetrize(A), eps), plan.normalization)
        if plan.direct_degree is not None:
            root = direct_root(A_hat, series=plan.series, degree=plan.direct_degree, inverse=inverse)
            Y, Z = (A_hat @ root, root) if inverse else (root, None)
            valid = torch.isfinite(root).flatten(-2).all(-1)
        else:
            record = [] if plan.gradient == "adjoint" else None
            if plan.mixed is not None:
                Y, Z = mixed_sqrt(A_hat, plan.mixed, functools.partial(tf32_products, A_hat.device))
            elif plan.fused_forward:
                from covpool.kernels.fused_iteration import fused_coupled_root

                Y, Z = fused_coupled_root(A_hat, plan.forward)
            else:
                Y, Z = coupled_root(A_hat, plan.forward, record)
            valid = passes_residual_test(
                A_hat, Y, Z, plan.check.limit, inverse=inverse, mixed=plan.mixed is not None
            )
            Z = Z if inverse else None
        root_scale = scale.sqrt()
        # NaN for an invalid matrix, folded into the scale (a (*, 1, 1) tensor) rather than the result.
        factor = torch.where(valid[..., None, None], root_scale, float("nan"))
        out = Z / factor if inverse else Y * factor
        if plan.gradient == "adjoint":
            ctx.save_for_backward(root_scale, *record)
        else:
            ctx.save_for_backward(root_scale, Y, Z)
        ctx.inverse = inverse
        ctx.plan = plan
        ctx.eps = eps
        ctx.mark_non_differentiable(valid)
        return out, valid

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _valid_grad: torch.Tensor):  # noqa: D102
        refuse_double_backward(ctx.plan.method)
        with products_in(ctx.plan.precision, grad.dtype):
            return MatmulRoot._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        root_scale, *saved = ctx.saved_tensors
        if ctx.plan.gradient == "adjoint":
            # out = √c Y or Z / √c with c held constant; Â = A / c.
            shape = grad.shape
            G = grad.reshape(-1, shape[-2], shape[-1])
            grads = (None, G) if ctx.inverse else (G, None)
            X = coupled_root_adjoint(ctx.plan.forward, tuple(saved), *grads).reshape(shape)
            X = X / (root_scale.pow(3) if ctx.inverse else root_scale)
            return symmetrize(with_relative_ridge(X, ctx.eps)), None, None, None
        Y, Z = saved
        G = symmetrize(grad)
        if ctx.inverse:
            # d(S⁻¹) = -S⁻¹ dS S⁻¹ with S⁻¹ = Z / √c: the right-hand side for dS is -Z G Z / c.
            G = Z @ G @ Z
            root_scale = -root_scale.pow(3)
        # S X + X S = G with S = √c Y is Y X' + X' Y = G and X = X' / √c (the solver is linear).
        if ctx.plan.mixed is not None:
            X = mixed_lyapunov(Y, G, ctx.plan.mixed, functools.partial(tf32_products, Y.device))
        elif ctx.plan.fused_backward:
            from covpool.kernels.fused_lyapunov import fused_solve_lyapunov

            X = fused_solve_lyapunov(Y, G, ctx.plan.backward)
        else:
            X = solve_lyapunov(Y, G, ctx.plan.backward)
        X = X / root_scale
        return with_relative_ridge(X, ctx.eps), None, None, None


def _unrolled_root(A: torch.Tensor, plan: RootPlan, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The coupled iteration on ``A / c``, differentiated by autograd through every step.

    iSQRT-COV's Newton-Schulz (ns), and mpa with ``backward="unrolled"`` (unrolled mtp takes the fused
    adjoint of :class:`MatmulRoot` instead). Validity: mpa passes the plan's residual test; ns only its
    test of gross failure (:data:`NS_DIVERGED`). The inverse root of an all-zero matrix is invalid as
    well. The backward's first and last nodes scope its products (:func:`scoped_backward`).
    """
    A = scoped_backward(A, enter=False)
    A_hat, scale = normalise(A, plan.normalization)
    Y, Z = coupled_root(A_hat, plan.forward)
    with torch.no_grad():
        if plan.check is None:
            valid = within_error(Y, Z, NS_DIVERGED, inverse=inverse)
        else:
            valid = passes_residual_test(A_hat, Y, Z, plan.check.limit, inverse=inverse)
        if inverse:
            valid = valid & (scale[..., 0, 0] > torch.finfo(scale.dtype).tiny)
    factor = torch.where(valid[..., None, None], scale.sqrt(), float("nan"))
    return scoped_backward(Z / factor if inverse else Y * factor, enter=True), valid


def _invalid_message(
    plan: RootPlan, options: RootOptions, inverse: bool, A: torch.Tensor, valid: torch.Tensor, eps: float
) -> str:
    definite = "definite" if inverse else "semi-definite"
    if plan.method == "eigh":
        return f"A must be symmetric positive {definite}: eigenvalues below the rounding level were found"
    if plan.method == "ns":
        return f"A must be symmetric positive {definite}: the Newton-Schulz iteration diverged"
    n = A.shape[-1]
    bound = (
        f"eps={eps:g} bounds κ(A) by {(n + eps) / eps:.3g}"
        if eps > 0 and options.condition is None
        else f"condition={options.condition or DEFAULT_CONDITION:g} is assumed"
    )
    tol = options.tol or DEFAULT_TOL
    reach = (
        f"tol={tol:g}" if plan.check.certifies <= tol else f"{plan.check.certifies:.2g} (the test's reach)"
    )
    residual = "Z Y = I" if plan.mixed is None else "Z Y = I and Y² = Â (precision='tf32')"
    return (
        f"A must be symmetric positive {definite} with a spectrum inside the bound method={plan.method!r} "
        f"was certified for ({bound}): the residual of {residual} shows an error beyond {reach}; "
        f"{estimated_condition(with_relative_ridge(A, eps), ~valid)}. Pass eps= (a relative ridge), a "
        "condition= at least that κ, or method='eigh'"
    )


def run_root(
    A: torch.Tensor, inverse: bool, plan: RootPlan, options: RootOptions, eps: float
) -> torch.Tensor:
    """``A^(±1/2)`` of ``A`` (``(*, n, n)``, validated) by ``plan`` (not the opaque one), with the host
    checks the plan reads and the count of flagged matrices."""
    if A.numel() == 0:
        return A.clone()
    # eigh swaps a non-finite matrix for the identity and flags it, so its finiteness is checked only when
    # a flag is down; the iterations would carry NaN through a factorisation, so theirs is checked first
    if plan.read_values and plan.method != "eigh":
        check_finite(A)
    work_dtype = working_dtype(A.dtype)
    with torch.autocast(device_type=A.device.type, enabled=False):
        A_work = A.to(work_dtype)
        if plan.gradient in ("lyapunov", "adjoint"):
            out, valid = MatmulRoot.apply(A_work, inverse, plan, eps)
        else:
            with products_in(plan.precision, work_dtype):
                A_ridged = with_relative_ridge(symmetrize(A_work), eps)  # differentiated by autograd
                if plan.method == "eigh":
                    out, valid = eigh_root(
                        A_ridged, inverse=inverse, precision=plan.precision, tol=plan.decomposition_tol
                    )
                else:
                    out, valid = _unrolled_root(A_ridged, plan, inverse=inverse)
    flagged = plan.read_values and not bool(valid.all())
    if flagged and plan.method == "eigh":
        check_finite(A)  # a NaN or Inf is named as such, before it is counted
    count_flagged(valid)
    if flagged:
        raise_if_invalid(valid, lambda: _invalid_message(plan, options, inverse, A_work.detach(), valid, eps))
    return out.to(A.dtype)
