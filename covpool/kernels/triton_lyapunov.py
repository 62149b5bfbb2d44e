"""Triton kernel of the Lyapunov sign iteration: every step of a backward schedule in one launch.

Launched by :func:`covpool.kernels.fused_lyapunov.fused_solve_lyapunov`, which imports this module on its
first call (Triton is imported at the top, as in :mod:`covpool.kernels.triton_iteration`, and for the same
reasons without ``from __future__ import annotations``). The arithmetic it must match, step for step, is
:func:`covpool.linalg.lyapunov.solve_lyapunov`: on ``M = [[B, C], [0, -B]]``, with ``B₀ = Y`` and
``C₀`` the right-hand side, each step applies ``p(M) = M q(M²)`` through the blocks, every scalar folded
as the reference's ``baddbmm`` folds it (:func:`covpool.linalg.lyapunov._sign_step`).

One program holds one pair ``(B, C)`` in registers, zero-padded to ``BLOCK × BLOCK``; every step is a
polynomial without constant term in ``B`` and ``C``, so the padding stays zero.
"""

import triton
import triton.language as tl


@triton.jit
def sign_iteration_kernel(
    Y,
    C_in,
    X_out,
    table,
    n,
    num_steps,
    BLOCK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``X`` with ``Y X + X Y = C`` for the pair ``program_id(0)``.

    ``Y``, ``C_in``, ``X_out``: contiguous ``(b, n, n)`` float32. ``table``: ``(num_steps, 5)`` float32, a
    row per step: ``c₀, c₁, c₂, c₂ / c₁, d`` (zeros for ``c₂`` and the ratio at degree ``d = 1``). The last
    step halves its off-diagonal block (``sign(M)`` holds ``2X`` there).
    """
    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK)
    valid = (rows[:, None] < n) & (cols[None, :] < n)
    offsets = tl.program_id(0).to(tl.int64) * n * n + rows[:, None] * n + cols[None, :]
    B = tl.load(Y + offsets, mask=valid, other=0.0)
    C = tl.load(C_in + offsets, mask=valid, other=0.0)
    for step in range(0, num_steps):
        c0 = tl.load(table + 5 * step)
        c1 = tl.load(table + 5 * step + 1)
        c2 = tl.load(table + 5 * step + 2)
        ratio = tl.load(table + 5 * step + 3)
        degree = tl.load(table + 5 * step + 4)
        c_scale = tl.where(step == num_steps - 1, 0.5, 1.0)
        B2 = tl.dot(B, B, input_precision=INPUT_PRECISION)
        BC = tl.dot(B, C, input_precision=INPUT_PRECISION)
        D = BC - tl.trans(BC)
        if degree == 1.0:
            # B H = c0 B + c1 B B²;  B K + C H = c1 B D + c0 C + c1 C B².
            inner = c0 * C + c1 * tl.dot(B, D, input_precision=INPUT_PRECISION)
            C = c_scale * inner + (c1 * c_scale) * tl.dot(C, B2, input_precision=INPUT_PRECISION)
            B = c0 * B + c1 * tl.dot(B, B2, input_precision=INPUT_PRECISION)
        else:
            # H = c0 I + T;  K = c1 (F - Fᵀ) with F = BC + (c2/c1) B²D.
            T = c1 * B2 + c2 * tl.dot(B2, B2, input_precision=INPUT_PRECISION)
            F = BC + ratio * tl.dot(B2, D, input_precision=INPUT_PRECISION)
            inner = c0 * C + c1 * tl.dot(B, F - tl.trans(F), input_precision=INPUT_PRECISION)
            C = c_scale * inner + c_scale * tl.dot(C, T, input_precision=INPUT_PRECISION)
            B = c0 * B + tl.dot(B, T, input_precision=INPUT_PRECISION)
    tl.store(X_out + offsets, C, mask=valid)
