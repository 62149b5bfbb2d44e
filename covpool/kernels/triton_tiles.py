"""Tile helpers shared by the fused kernels: iterates in a per-matrix scratch buffer, products as K-loops.

A program keeps one matrix's iterates in global memory, in ``BLOCK × BLOCK`` row-major tiles of a scratch
buffer that only it touches (16 KB a tile at ``BLOCK = 64``, where L2 holds them), zero outside the leading
``n × n`` block. A product reads its two factors from there in ``BLOCK_K``-wide slices and accumulates one
``BLOCK × BLOCK`` tile in registers, as a GEMM's inner loop does; an update then writes its result back.
So a program holds about two tiles (the accumulator and the added term) at a time, not every iterate: that
is what keeps the kernels free of register spills up to ``BLOCK = 128``, where holding the iterates in
registers spilled from ``BLOCK = 64`` on (issue #25).

Every write of a tile sits between two barriers: the first lets every thread finish reading the old value
(an update may overwrite one of its own factors), the second makes the new value visible to every thread
of the program before it is read (a CTA barrier orders its threads' global memory accesses). Programs never
share tiles, so no grid-wide synchronisation is needed. The interpreter runs a program's threads as one, so
there the barriers are no-ops and the order is the program order.

Imported by :mod:`covpool.kernels.triton_iteration` and :mod:`covpool.kernels.triton_lyapunov` (Triton at
the top, and no ``from __future__ import annotations``, for the reasons given there).
"""

import triton
import triton.language as tl


@triton.jit
def load_tile(S, BLOCK: tl.constexpr, TRANS: tl.constexpr):
    """The tile at ``S`` (``S`` transposed where ``TRANS``)."""
    rows = tl.arange(0, BLOCK)
    if TRANS:
        return tl.load(S + rows[None, :] * BLOCK + rows[:, None])
    return tl.load(S + rows[:, None] * BLOCK + rows[None, :])


@triton.jit
def store_tile(S, value, BLOCK: tl.constexpr):
    """Write ``value`` to the tile at ``S`` between two barriers (see the module docstring)."""
    rows = tl.arange(0, BLOCK)
    tl.debug_barrier()
    tl.store(S + rows[:, None] * BLOCK + rows[None, :], value)
    tl.debug_barrier()


@triton.jit
def identity(n, BLOCK: tl.constexpr):
    """``I`` of the leading ``n × n`` block, zero elsewhere."""
    rows = tl.arange(0, BLOCK)
    return tl.where((rows[:, None] == rows[None, :]) & (rows[:, None] < n), 1.0, 0.0)


@triton.jit
def product(
    A,
    B,
    n,
    ANTISYMMETRIC: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``A B`` of the tiles at ``A`` and ``B`` (``A (B - Bᵀ)`` where ``ANTISYMMETRIC``, the difference
    formed in float32 as the reference forms it), accumulated in float32 over ``BLOCK_K``-wide slices."""
    rows = tl.arange(0, BLOCK)
    inner = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k in range(0, n, BLOCK_K):  # past n the tiles hold zeros
        a = tl.load(A + rows[:, None] * BLOCK + (k + inner)[None, :])
        b = tl.load(B + (k + inner)[:, None] * BLOCK + rows[None, :])
        if ANTISYMMETRIC:
            b = b - tl.load(B + rows[None, :] * BLOCK + (k + inner)[:, None])
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def update(
    D,
    A,
    B,
    C,
    n,
    alpha,
    beta,
    ANTISYMMETRIC: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``D ← β C + α A B`` on tiles (``torch.baddbmm(C, A, B, beta=β, alpha=α)``; ``A (B - Bᵀ)`` where
    ``ANTISYMMETRIC``). ``D`` may be any of ``A``, ``B``, ``C``: every read precedes the write."""
    acc = product(A, B, n, ANTISYMMETRIC, BLOCK, BLOCK_K, INPUT_PRECISION)
    store_tile(D, beta * load_tile(C, BLOCK, False) + alpha * acc, BLOCK)


@triton.jit
def assign_product(
    D, A, B, n, alpha, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr
):
    """``D ← α A B`` on tiles; ``D`` may be ``A`` or ``B``."""
    acc = product(A, B, n, False, BLOCK, BLOCK_K, INPUT_PRECISION)
    store_tile(D, alpha * acc, BLOCK)
