"""The unrolled backward: reverse mode through the coupled polynomial iteration, every sum fused.

The Lyapunov backward (:mod:`covpool.linalg.lyapunov`) solves with the computed root, and in float32 its
gradient loses about ``0.03 u κ(A)`` to rounding (:func:`covpool.linalg.lyapunov.rounding_error`: 1e-3
near ``κ = 3e5``, which the ridge of a covariance head allows). Differentiating the steps that were
actually computed does not: it is the exact gradient of a function that is within
:func:`covpool.linalg.schedule.gradient_error` of the root's (the schedule is extended until that is
within ``tol``), and measured in float32 it stays near 1e-4 where the Lyapunov gradient is 1e-3 … 1e-2.

For a step ``U = Z Y``, ``a T = q(U) - c₀ I`` (:func:`covpool.linalg.iteration._polynomial_tail`),
``Y' = c₀ Y + a Y T``, ``Z' = c₀ Z + a T Z``, the adjoints are

- ``T̄ = a (Yᵀ Ȳ' + Z̄' Zᵀ)``, then ``Ū`` by the reverse of the Horner recursion;
- ``Ȳ = c₀ Ȳ' + a Ȳ' Tᵀ + Zᵀ Ū`` and ``Z̄ = c₀ Z̄' + a Tᵀ Z̄' + Ū Yᵀ``,

each sum folded into a ``baddbmm``: a degree-2 step takes 8 products in 8 kernels (its forward: 4).
The first step has ``Z = I`` and ``U = Y``. What it needs is kept from the forward
(:func:`covpool.linalg.iteration.coupled_root` with ``record``): ``Y``, ``Z``, ``U`` and ``T`` per step,
as autograd would keep for ns.
"""

from __future__ import annotations

import torch

from covpool.linalg.schedule import PolynomialStep, Schedule


def _tail_adjoint(
    U: torch.Tensor, partials: list[torch.Tensor], coefficients: tuple[float, ...], grad: torch.Tensor
) -> torch.Tensor:
    """``Ū`` from ``T̄`` through the Horner levels ``V_{i+1} = c U + a_i U V_i`` (``V_0 = U``, ``a_0 = c_d``).

    Shapes ``(b, n, n)``.
    """
    degree = len(coefficients) - 1
    if degree == 1:  # T = U
        return grad
    level_coefficients = list(reversed(coefficients[1:-1]))
    scales = [coefficients[-1]] + [1.0] * (degree - 2)
    U_bar, V_bar = None, grad
    for i in reversed(range(degree - 1)):
        c, a = level_coefficients[i], scales[i]
        if U_bar is None:
            U_bar = torch.baddbmm(V_bar, V_bar, partials[i].mT, beta=c, alpha=a)
        else:
            U_bar = torch.baddbmm(torch.add(U_bar, V_bar, alpha=c), V_bar, partials[i].mT, alpha=a)
        if i > 0:
            V_bar = U.mT @ V_bar
        else:  # V_0 = U: its gradient goes straight into Ū
            U_bar = torch.baddbmm(U_bar, U.mT, V_bar, alpha=a)
    return U_bar


def _tail_gradient(
    Y: torch.Tensor,
    Z: torch.Tensor | None,
    Y_bar: torch.Tensor | None,
    Z_bar: torch.Tensor | None,
    alpha: float,
) -> torch.Tensor:
    """``T̄ = a (Yᵀ Ȳ' + Z̄' Zᵀ)`` in fused products; ``Z = I`` when None, a None gradient is zero.

    Shapes ``(b, n, n)``.
    """
    if Y_bar is None:
        return alpha * Z_bar if Z is None else torch.baddbmm(Z_bar, Z_bar, Z.mT, beta=0.0, alpha=alpha)
    if Z_bar is None:
        return torch.baddbmm(Y_bar, Y.mT, Y_bar, beta=0.0, alpha=alpha)
    if Z is None:
        return torch.baddbmm(Z_bar, Y.mT, Y_bar, beta=alpha, alpha=alpha)
    return torch.baddbmm(Y.mT @ Y_bar, Z_bar, Z.mT, beta=alpha, alpha=alpha)


def coupled_root_adjoint(
    schedule: Schedule,
    record: tuple[torch.Tensor, ...],
    grad_Y: torch.Tensor | None,
    grad_Z: torch.Tensor | None,
) -> torch.Tensor:
    """Gradient with respect to ``Â`` of ``⟨grad_Y, Y⟩ + ⟨grad_Z, Z⟩`` for ``(Y, Z) = coupled_root(Â)``.

    Args:
        schedule: the polynomial steps the forward took.
        record: what :func:`covpool.linalg.iteration.coupled_root` recorded.
        grad_Y: ``(b, n, n)`` gradient of the square root, or None.
        grad_Z: ``(b, n, n)`` gradient of the inverse root, or None.

    Returns:
        ``(b, n, n)``, not symmetrised.
    """
    steps: list[tuple] = []
    position = 0
    for k, step in enumerate(schedule.steps):
        if not isinstance(step, PolynomialStep):
            raise TypeError("the fused unrolled backward takes polynomial steps only")
        # The degree from the coefficients: dynamo cannot call the step's degree property here.
        size = 3 + (k > 0) + (len(step.coefficients) - 2)
        Y, *rest = record[position : position + size]
        Z = rest.pop(0) if k > 0 else None
        U, *partials, T = rest
        steps.append((step.coefficients, Y, Z, U, partials, T))
        position += size
    Y_bar, Z_bar = grad_Y, grad_Z
    for coefficients, Y, Z, U, partials, T in reversed(steps):
        c0, alpha = coefficients[0], (coefficients[-1] if len(coefficients) == 2 else 1.0)
        U_bar = _tail_adjoint(U, partials, coefficients, _tail_gradient(Y, Z, Y_bar, Z_bar, alpha))
        if Z is None:  # first step: U = Y, and Z' = c₀ I + a T has no Z to pass a gradient to
            return U_bar if Y_bar is None else torch.baddbmm(Y_bar, Y_bar, T.mT, beta=c0, alpha=alpha) + U_bar
        Y_t, Z_t = Y.mT, Z.mT
        next_Y_bar = (
            Z_t @ U_bar
            if Y_bar is None
            else torch.baddbmm(torch.baddbmm(Y_bar, Y_bar, T.mT, beta=c0, alpha=alpha), Z_t, U_bar)
        )
        next_Z_bar = (
            U_bar @ Y_t
            if Z_bar is None
            else torch.baddbmm(torch.baddbmm(Z_bar, T.mT, Z_bar, beta=c0, alpha=alpha), U_bar, Y_t)
        )
        Y_bar, Z_bar = next_Y_bar, next_Z_bar
    raise ValueError("the schedule has no steps")
