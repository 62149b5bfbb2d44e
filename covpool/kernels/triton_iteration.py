"""Triton kernel of the coupled forward iteration: every step of a schedule in one launch.

Launched by :func:`covpool.kernels.fused_iteration.fused_coupled_root`, which imports this module on its
first call: Triton is imported here at the top, so that the kernels are plain module-level
``@triton.jit`` functions, the form every Triton version accepts (``TRITON_INTERPRET=1`` must be set
before this module is imported for the interpreter to run them). The arithmetic it must match, step for
step, is :func:`covpool.linalg.iteration.coupled_root`.

One program holds one matrix in registers, padded to ``BLOCK × BLOCK`` with zeros: the identity it uses is
the identity of the leading ``n × n`` block only, so every iterate keeps exact zeros outside that block and
no step needs a mask (a Padé step's Cholesky factorisation and substitutions run over the ``n`` valid
pivots only).

Without ``from __future__ import annotations``: Triton 3.0's interpreter (torch 2.4's) recognises
``tl.constexpr`` parameters by their evaluated annotation only.
"""

import triton
import triton.language as tl


@triton.jit
def _polynomial_tail(U, coefficients, degree, INPUT_PRECISION: tl.constexpr):
    """``(T, a)`` with ``a T = q(U) - c₀ I``: Horner's rule from the top coefficient, as the reference's
    ``_polynomial_tail`` (``coefficients`` points at ``c₀``)."""
    tail = U
    alpha = tl.load(coefficients + degree)
    for j in range(degree - 1, 0, -1):
        tail = tl.load(coefficients + j) * U + alpha * tl.dot(U, tail, input_precision=INPUT_PRECISION)
        alpha = 1.0
    return tail, alpha


@triton.jit
def _pade_factor(U, eye, rows, cols, n, table, degree, INPUT_PRECISION: tl.constexpr):
    """``q(U) = μ Q(W)⁻¹ P(W)`` at ``W = I - μ² sym(U)``, as the reference's ``_pade_factor``.

    ``table`` holds ``μ, -μ², p₀ … p_d, q₀ … q_d``. ``P`` and ``Q`` are sums of the powers of ``W`` (the
    reference's Paterson-Stockmeyer scheme for degrees whose best block is ``d + 1``, up to 4). ``Q`` is
    factored ``L Lᵀ`` from its lower triangle (right-looking: column ``k`` of ``L`` is the current column
    ``k`` scaled by its pivot's square root), with the forward substitution ``L V = P`` carried along; then
    ``Lᵀ X = V`` backwards. A non-positive pivot gives NaN, which the residual test catches.
    """
    Ut = tl.trans(U)
    W = eye + tl.load(table + 1) * (Ut - (Ut - U) * 0.5)  # torch.lerp(U, Uᵀ, 0.5)'s rounding
    P = tl.load(table + 2) * eye + tl.load(table + 3) * W
    Q = tl.load(table + degree + 3) * eye + tl.load(table + degree + 4) * W
    power = W
    for k in range(2, degree + 1):
        power = tl.dot(power, W, input_precision=INPUT_PRECISION)
        P += tl.load(table + 2 + k) * power
        Q += tl.load(table + degree + 3 + k) * power
    L = tl.zeros_like(Q)
    pivots = tl.zeros_like(rows.to(tl.float32))
    for k in range(0, n):
        column = tl.sum(tl.where(cols[None, :] == k, Q, 0.0), axis=1)
        pivot = tl.sqrt(tl.sum(tl.where(rows == k, column, 0.0), axis=0))
        below = tl.where(rows > k, column / pivot, 0.0)
        Q -= below[:, None] * below[None, :]
        L = tl.where(cols[None, :] == k, tl.where(rows == k, pivot, below)[:, None], L)
        pivots = tl.where(rows == k, pivot, pivots)
        solved = tl.sum(tl.where(rows[:, None] == k, P, 0.0), axis=0) / pivot
        P = tl.where(rows[:, None] == k, solved[None, :], P - below[:, None] * solved[None, :])
    Lt = tl.trans(L)
    for step in range(0, n):
        k = n - 1 - step
        pivot = tl.sum(tl.where(rows == k, pivots, 0.0), axis=0)
        solved = tl.sum(tl.where(rows[:, None] == k, P, 0.0), axis=0) / pivot
        above = tl.where(rows < k, tl.sum(tl.where(cols[None, :] == k, Lt, 0.0), axis=1), 0.0)
        P = tl.where(rows[:, None] == k, solved[None, :], P - above[:, None] * solved[None, :])
    return P * tl.load(table)


@triton.jit
def coupled_root_kernel(
    A,
    Y_out,
    Z_out,
    table,
    n,
    num_steps,
    width,
    degree,
    PADE: tl.constexpr,
    BLOCK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``(Y, Z) ≈ (Â^(1/2), Â^(-1/2))`` of matrix ``program_id(0)`` after ``num_steps`` steps.

    ``A``, ``Y_out``, ``Z_out``: contiguous ``(b, n, n)`` float32. ``table``: ``(num_steps, width)`` float32,
    a row per step: ``c₀ … c_d`` (polynomial steps, ``d`` in column ``width - 1``) or ``μ, -μ², p, q``
    (Padé steps of ``degree``). The first step starts from ``U = Y = Â`` and ``Z = I``, as the reference's.
    """
    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK)
    valid = (rows[:, None] < n) & (cols[None, :] < n)
    offsets = tl.program_id(0).to(tl.int64) * n * n + rows[:, None] * n + cols[None, :]
    eye = tl.where(valid & (rows[:, None] == cols[None, :]), 1.0, 0.0)
    Y = tl.load(A + offsets, mask=valid, other=0.0)
    if PADE:
        factor = _pade_factor(Y, eye, rows, cols, n, table, degree, INPUT_PRECISION)
        Y = tl.dot(Y, factor, input_precision=INPUT_PRECISION)
        Z = factor
        for step in range(1, num_steps):
            U = tl.dot(Z, Y, input_precision=INPUT_PRECISION)
            factor = _pade_factor(U, eye, rows, cols, n, table + step * width, degree, INPUT_PRECISION)
            Y = tl.dot(Y, factor, input_precision=INPUT_PRECISION)
            Z = tl.dot(factor, Z, input_precision=INPUT_PRECISION)
    else:
        step_degree = tl.load(table + width - 1).to(tl.int32)
        tail, alpha = _polynomial_tail(Y, table, step_degree, INPUT_PRECISION)
        c0 = tl.load(table)
        Z = (tail + (c0 / alpha) * eye) * alpha
        Y = c0 * Y + alpha * tl.dot(Y, tail, input_precision=INPUT_PRECISION)
        for step in range(1, num_steps):
            coefficients = table + step * width
            step_degree = tl.load(coefficients + width - 1).to(tl.int32)
            U = tl.dot(Z, Y, input_precision=INPUT_PRECISION)
            tail, alpha = _polynomial_tail(U, coefficients, step_degree, INPUT_PRECISION)
            c0 = tl.load(coefficients)
            Y_next = c0 * Y + alpha * tl.dot(Y, tail, input_precision=INPUT_PRECISION)
            Z = c0 * Z + alpha * tl.dot(tail, Z, input_precision=INPUT_PRECISION)
            Y = Y_next
    tl.store(Y_out + offsets, Y, mask=valid)
    tl.store(Z_out + offsets, Z, mask=valid)
