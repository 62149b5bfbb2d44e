"""Triton kernel of the Lyapunov sign iteration: every step of a backward schedule in one launch.

Launched by :func:`covpool.kernels.fused_lyapunov.fused_solve_lyapunov`, which imports this module on its
first call (Triton is imported at the top, as in :mod:`covpool.kernels.triton_iteration`, and for the same
reasons without ``from __future__ import annotations``). The arithmetic it must match, step for step, is
:func:`covpool.linalg.lyapunov.solve_lyapunov`: on ``M = [[B, C], [0, -B]]``, with ``B₀ = Y`` and
``C₀`` the right-hand side, each step applies ``p(M) = M q(M²)`` through the blocks, every scalar folded
as the reference's ``baddbmm`` folds it (:func:`covpool.linalg.lyapunov.rhs_step`,
:func:`covpool.linalg.lyapunov.operator_step`): each ``baddbmm`` is one tile update here.

One program runs one pair ``(B, C)``, its iterates in its own tiles of a scratch buffer, zero-padded to
``BLOCK × BLOCK``, each product a K-loop over them (:mod:`covpool.kernels.triton_tiles`); every step is a
polynomial without constant term in ``B`` and ``C``, so the padding stays zero. Tiles per pair: ``B``,
``C``, ``B²``, ``BC`` (then ``F``), ``T``, and the partial sum ``B K + c₀ C``.
"""

import triton
import triton.language as tl

from covpool.kernels.triton_tiles import load_tile, product, store_tile, update

# the tiles of a program's scratch, in order (constexpr: a kernel reads no other globals)
_B = tl.constexpr(0)
_C = tl.constexpr(1)
_B2 = tl.constexpr(2)
_BC = tl.constexpr(3)
_T = tl.constexpr(4)
_X = tl.constexpr(5)


@triton.jit
def sign_iteration_kernel(
    Y,
    C_in,
    X_out,
    table,
    scratch,
    n,
    num_steps,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``X`` with ``Y X + X Y = C`` for the pair ``program_id(0)``.

    ``Y``, ``C_in``, ``X_out``: contiguous ``(b, n, n)`` float32. ``table``: ``(num_steps, 5)`` float32, a
    row per step: ``c₀, c₁, c₂, c₂ / c₁, d`` (zeros for ``c₂`` and the ratio at degree ``d = 1``).
    ``scratch``: ``(b, 6, BLOCK, BLOCK)`` float32, any contents. The last step halves its off-diagonal
    block (``sign(M)`` holds ``2X`` there).
    """
    tile = BLOCK * BLOCK
    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK)
    valid = (rows[:, None] < n) & (cols[None, :] < n)
    offsets = tl.program_id(0).to(tl.int64) * n * n + rows[:, None] * n + cols[None, :]
    S = scratch + tl.program_id(0).to(tl.int64) * 6 * tile
    B, C, B2, BC, T, X = (
        S + _B * tile,
        S + _C * tile,
        S + _B2 * tile,
        S + _BC * tile,
        S + _T * tile,
        S + _X * tile,
    )
    store_tile(B, tl.load(Y + offsets, mask=valid, other=0.0), BLOCK)
    store_tile(C, tl.load(C_in + offsets, mask=valid, other=0.0), BLOCK)
    for step in range(0, num_steps):
        c0 = tl.load(table + 5 * step)
        c1 = tl.load(table + 5 * step + 1)
        c2 = tl.load(table + 5 * step + 2)
        ratio = tl.load(table + 5 * step + 3)
        degree = tl.load(table + 5 * step + 4)
        c_scale = tl.where(step == num_steps - 1, 0.5, 1.0)
        store_tile(B2, product(B, B, n, False, BLOCK, BLOCK_K, INPUT_PRECISION), BLOCK)
        store_tile(BC, product(B, C, n, False, BLOCK, BLOCK_K, INPUT_PRECISION), BLOCK)
        if degree == 1.0:
            # B K + C H = c1 B D + c0 C + c1 C B², D = BC - (BC)ᵀ;  B H = c0 B + c1 B B².
            update(X, B, BC, C, n, c1, c0, True, BLOCK, BLOCK_K, INPUT_PRECISION)
            update(C, C, B2, X, n, c1 * c_scale, c_scale, False, BLOCK, BLOCK_K, INPUT_PRECISION)
            update(B, B, B2, B, n, c1, c0, False, BLOCK, BLOCK_K, INPUT_PRECISION)
        else:
            # H = c0 I + T, T = c1 B² + c2 B⁴;  K = c1 (F - Fᵀ) with F = BC + (c2/c1) B²D.
            update(T, B2, B2, B2, n, c2, c1, False, BLOCK, BLOCK_K, INPUT_PRECISION)
            update(BC, B2, BC, BC, n, ratio, 1.0, True, BLOCK, BLOCK_K, INPUT_PRECISION)
            update(X, B, BC, C, n, c1, c0, True, BLOCK, BLOCK_K, INPUT_PRECISION)
            update(C, C, T, X, n, c_scale, c_scale, False, BLOCK, BLOCK_K, INPUT_PRECISION)
            update(B, B, T, B, n, 1.0, c0, False, BLOCK, BLOCK_K, INPUT_PRECISION)
    tl.store(X_out + offsets, load_tile(C, BLOCK, False), mask=valid)
