"""Triton kernel of the coupled forward iteration: every step of a schedule in one launch.

Launched by :func:`covpool.kernels.fused_iteration.fused_coupled_root`, which imports this module on its
first call: Triton is imported here at the top, so that the kernels are plain module-level
``@triton.jit`` functions, the form every Triton version accepts (``TRITON_INTERPRET=1`` must be set
before this module is imported for the interpreter to run them). The arithmetic it must match, step for
step, is :func:`covpool.linalg.iteration.coupled_root`.

One program runs one matrix. Its iterates live in its own tiles of a scratch buffer, zero-padded to
``BLOCK × BLOCK``, and every product is a K-loop over them (:mod:`covpool.kernels.triton_tiles`): a
program holds an accumulator and one added tile in registers, not the whole iteration, so it does not
spill (issue #25). The identity it uses is that of the leading ``n × n`` block only, so every iterate keeps
exact zeros outside that block and no step needs a mask (a Padé step's Cholesky factorisation and
substitutions run over the ``n`` valid pivots only).

Scratch tiles per matrix (:func:`covpool.kernels.fused_iteration.scratch_tiles`): ``Y``, ``Z``, ``U``
(which a Padé step overwrites with ``W``), the Padé power, ``P`` (then the factor), ``Q`` (then ``L``).

Without ``from __future__ import annotations``: Triton 3.0's interpreter (torch 2.4's) recognises
``tl.constexpr`` parameters by their evaluated annotation only.
"""

import triton
import triton.language as tl

from covpool.kernels.triton_tiles import assign_product, identity, load_tile, product, store_tile, update

# the tiles of a program's scratch, in order (constexpr: a kernel reads no other globals)
_Y = tl.constexpr(0)
_Z = tl.constexpr(1)
_U = tl.constexpr(2)
_POWER = tl.constexpr(3)
_P = tl.constexpr(4)
_Q = tl.constexpr(5)


@triton.jit
def _pade_factor(
    U, S, n, table, degree, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr
):
    """``q(U) = μ Q(W)⁻¹ P(W)`` at ``W = I - μ² sym(U)``, as the reference's ``_pade_factor``, returned in
    registers; ``U`` is a tile, ``S`` the program's scratch (``W`` goes to its ``U`` tile).

    ``table`` holds ``μ, -μ², p₀ … p_d, q₀ … q_d``. ``P`` and ``Q`` are sums of the powers of ``W`` (the
    reference's Paterson-Stockmeyer scheme for degrees whose best block is ``d + 1``, up to 4). ``Q`` is
    factored ``L Lᵀ`` from its lower triangle (right-looking: column ``k`` of ``L`` is the current column
    ``k`` scaled by its pivot's square root, written over that column of ``Q``), with the forward
    substitution ``L V = P`` carried along; then ``Lᵀ X = V`` backwards, reading the rows of ``L`` from its
    tile. A non-positive pivot gives NaN, which the residual test catches.
    """
    tile = BLOCK * BLOCK
    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK)
    eye = identity(n, BLOCK)
    Ut = load_tile(U, BLOCK, True)
    W = eye + tl.load(table + 1) * (Ut - (Ut - load_tile(U, BLOCK, False)) * 0.5)  # torch.lerp(U, Uᵀ, 0.5)
    store_tile(S + _U * tile, W, BLOCK)
    store_tile(S + _P * tile, tl.load(table + 2) * eye + tl.load(table + 3) * W, BLOCK)
    store_tile(S + _Q * tile, tl.load(table + degree + 3) * eye + tl.load(table + degree + 4) * W, BLOCK)
    power = S + _U * tile
    for k in range(2, degree + 1):
        acc = product(power, S + _U * tile, n, False, BLOCK, BLOCK_K, INPUT_PRECISION)
        store_tile(S + _POWER * tile, acc, BLOCK)
        power = S + _POWER * tile
        store_tile(
            S + _P * tile, load_tile(S + _P * tile, BLOCK, False) + tl.load(table + 2 + k) * acc, BLOCK
        )
        Q_k = load_tile(S + _Q * tile, BLOCK, False) + tl.load(table + degree + 3 + k) * acc
        store_tile(S + _Q * tile, Q_k, BLOCK)
    Q = load_tile(S + _Q * tile, BLOCK, False)
    P = load_tile(S + _P * tile, BLOCK, False)
    for k in range(0, n):
        column = tl.sum(tl.where(cols[None, :] == k, Q, 0.0), axis=1)
        pivot = tl.sqrt(tl.sum(tl.where(rows == k, column, 0.0), axis=0))
        below = tl.where(rows > k, column / pivot, 0.0)
        Q -= below[:, None] * below[None, :]
        Q = tl.where(cols[None, :] == k, tl.where(rows == k, pivot, below)[:, None], Q)
        solved = tl.sum(tl.where(rows[:, None] == k, P, 0.0), axis=0) / pivot
        P = tl.where(rows[:, None] == k, solved[None, :], P - below[:, None] * solved[None, :])
    L = S + _Q * tile
    store_tile(L, Q, BLOCK)
    for step in range(0, n):
        k = n - 1 - step
        pivot = tl.load(L + k * BLOCK + k)
        solved = tl.sum(tl.where(rows[:, None] == k, P, 0.0), axis=0) / pivot
        above = tl.load(L + k * BLOCK + rows, mask=rows < k, other=0.0)  # row k of L, left of the pivot
        P = tl.where(rows[:, None] == k, solved[None, :], P - above[:, None] * solved[None, :])
    return P * tl.load(table)


@triton.jit
def _polynomial_tail(
    U, T, n, coefficients, degree, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr
):
    """``(tail, a)``: the tile holding ``T`` with ``a T = q(U) - c₀ I`` (``T`` there; ``U`` itself at
    degree 1), by Horner's rule from the top coefficient, as the reference's ``_polynomial_tail``
    (``coefficients`` points at ``c₀``)."""
    tail = U
    alpha = tl.load(coefficients + degree)
    for j in range(degree - 1, 0, -1):
        update(T, U, tail, U, n, alpha, tl.load(coefficients + j), False, BLOCK, BLOCK_K, INPUT_PRECISION)
        tail = T
        alpha = 1.0
    return tail, alpha


@triton.jit
def coupled_root_kernel(
    A,
    Y_out,
    Z_out,
    table,
    scratch,
    n,
    num_steps,
    width,
    degree,
    PADE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``(Y, Z) ≈ (Â^(1/2), Â^(-1/2))`` of matrix ``program_id(0)`` after ``num_steps`` steps.

    ``A``, ``Y_out``, ``Z_out``: contiguous ``(b, n, n)`` float32. ``table``: ``(num_steps, width)`` float32,
    a row per step: ``c₀ … c_d`` (polynomial steps, ``d`` in column ``width - 1``) or ``μ, -μ², p, q``
    (Padé steps of ``degree``). ``scratch``: ``(b, 6, BLOCK, BLOCK)`` float32 for Padé steps,
    ``(b, 4, BLOCK, BLOCK)`` for polynomial ones (``Y``, ``Z``, ``U`` and the tail's tile), any contents.
    The first step starts from ``U = Y = Â`` and ``Z = I``, as the reference's.
    """
    tile = BLOCK * BLOCK
    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK)
    valid = (rows[:, None] < n) & (cols[None, :] < n)
    offsets = tl.program_id(0).to(tl.int64) * n * n + rows[:, None] * n + cols[None, :]
    if PADE:
        S = scratch + tl.program_id(0).to(tl.int64) * 6 * tile
    else:
        S = scratch + tl.program_id(0).to(tl.int64) * 4 * tile
    Y, Z, U = S + _Y * tile, S + _Z * tile, S + _U * tile
    store_tile(Y, tl.load(A + offsets, mask=valid, other=0.0), BLOCK)
    if PADE:
        factor = _pade_factor(Y, S, n, table, degree, BLOCK, BLOCK_K, INPUT_PRECISION)
        store_tile(S + _P * tile, factor, BLOCK)
        store_tile(Z, factor, BLOCK)
        assign_product(Y, Y, S + _P * tile, n, 1.0, BLOCK, BLOCK_K, INPUT_PRECISION)
        for step in range(1, num_steps):
            assign_product(U, Z, Y, n, 1.0, BLOCK, BLOCK_K, INPUT_PRECISION)
            factor = _pade_factor(U, S, n, table + step * width, degree, BLOCK, BLOCK_K, INPUT_PRECISION)
            store_tile(S + _P * tile, factor, BLOCK)
            assign_product(Y, Y, S + _P * tile, n, 1.0, BLOCK, BLOCK_K, INPUT_PRECISION)
            assign_product(Z, S + _P * tile, Z, n, 1.0, BLOCK, BLOCK_K, INPUT_PRECISION)
    else:
        step_degree = tl.load(table + width - 1).to(tl.int32)
        tail, alpha = _polynomial_tail(Y, U, n, table, step_degree, BLOCK, BLOCK_K, INPUT_PRECISION)
        c0 = tl.load(table)
        store_tile(Z, (load_tile(tail, BLOCK, False) + (c0 / alpha) * identity(n, BLOCK)) * alpha, BLOCK)
        update(Y, Y, tail, Y, n, alpha, c0, False, BLOCK, BLOCK_K, INPUT_PRECISION)
        for step in range(1, num_steps):
            coefficients = table + step * width
            step_degree = tl.load(coefficients + width - 1).to(tl.int32)
            assign_product(U, Z, Y, n, 1.0, BLOCK, BLOCK_K, INPUT_PRECISION)
            tail, alpha = _polynomial_tail(
                U, S + _POWER * tile, n, coefficients, step_degree, BLOCK, BLOCK_K, INPUT_PRECISION
            )
            c0 = tl.load(coefficients)
            update(Y, Y, tail, Y, n, alpha, c0, False, BLOCK, BLOCK_K, INPUT_PRECISION)
            update(Z, tail, Z, Z, n, alpha, c0, False, BLOCK, BLOCK_K, INPUT_PRECISION)
    tl.store(Y_out + offsets, load_tile(Y, BLOCK, False), mask=valid)
    tl.store(Z_out + offsets, load_tile(Z, BLOCK, False), mask=valid)
