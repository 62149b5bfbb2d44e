"""Mixed-precision study: the square root and its gradient with TF32/bfloat16 products, emulated on CPU.

``python examples/studies/mixed.py`` runs, on float32 inputs normalised as the mtp plan does (``Â``), each
configuration below and measures the relative Frobenius errors of ``Y ≈ Â^(1/2)``, ``Z ≈ Â^(-1/2)`` and of
the Lyapunov gradient ``X`` (``Y X + X Y = G``, ``G`` Gaussian) against float64 eigendecompositions of the
same ``Â`` (:mod:`covpool.testing`), the worst over the batch. Products are rounded to the format by
:func:`covpool.linalg.emulation.emulated_products` and counted; ``cost`` is the float32-product equivalent
at the H200 ratios of issue #18 (one n = 256 bmm: float32 49 µs, TF32 18 µs, bfloat16 6.3 µs, taken as
1/5 and 1/10).

Configurations (all on the mtp plan of the input; its gradient taken by the Lyapunov solver):

- ``float32``: the plan, every product in float32 (the reference cost).
- ``all``: the plan, every product in the format.
- ``staged k/j``: the first ``k`` forward steps and ``j`` sign steps in the format, the rest in float32.
- ``refine r/s``: :func:`covpool.linalg.mixed.mixed_sqrt` and :func:`~covpool.linalg.mixed.mixed_lyapunov`
  with ``r`` forward refinements and ``s`` backward corrections (``margin 0``: without the margins);
  ``refine 2/float32``: that forward, the plan's sign iteration in float32.

Inputs: ``random_spd`` at condition 1e3 (the plan assumes ``condition=1e3``) and the heads' ridged
covariances (49 samples, a 7 × 7 map, ``eps=1e-4``).

Prints the rows and, per input set, the cheapest low-precision configuration that meets the target;
writes ``mixed.csv`` and ``mixed.json`` under ``--out`` (``examples/results/``: the recorded results
:mod:`covpool.linalg.mixed` cites for its design). The default sizes take about 15 s on 2 cores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from study import make_parser, normalised, parse, write_rows
from tqdm.auto import tqdm

from covpool.bench.report import format_table
from covpool.linalg.emulation import EPSILON, ProductCounter, emulated_products
from covpool.linalg.iteration import coupled_root
from covpool.linalg.lyapunov import operator_step, rhs_step
from covpool.linalg.mixed import (
    ProductHook,
    mixed_error_bound,
    mixed_lyapunov,
    mixed_plan,
    mixed_sqrt,
)
from covpool.linalg.planner import RootPlan
from covpool.linalg.precision import products_in
from covpool.linalg.schedule import BACKWARD_DEGREES, Schedule, minimax_schedule
from covpool.numerics import symmetrize
from covpool.testing import random_covariance, random_spd, reference_gradient, reference_root, relative_error

MIXED_SIZES = (64, 256)
MIXED_BATCH = 8
SAMPLES = 49
HEAD_EPS = 1e-4
CONDITION = 1e3
TARGET = 1e-3
COST = {"float32": 1.0, "tf32": 1 / 5, "bf16": 1 / 10}
"""Time of one product relative to a float32 product (issue #18's H200 figures, rounded)."""


@dataclass(frozen=True)
class Case:
    """One input set: float32 ``Â`` ``(batch, n, n)``, the mtp plan it was normalised for, a gradient."""

    name: str
    A_hat: torch.Tensor
    plan: RootPlan
    sign: Schedule
    upstream: torch.Tensor


def make_case(name: str, n: int, *, batch: int = MIXED_BATCH, seed: int = 0) -> Case:
    """``"spd"``: ``random_spd`` at condition 1e3; ``"head"``: ridged sample covariances of 49 positions."""
    generator = torch.Generator().manual_seed(seed)
    if name == "spd":
        A, eps, condition = random_spd(batch, n=n, condition=CONDITION, generator=generator), 0.0, CONDITION
    else:
        A, eps, condition = (
            random_covariance(batch, n=n, samples=SAMPLES, generator=generator),
            HEAD_EPS,
            None,
        )
    A_hat, plan = normalised(A, eps=eps, condition=condition)
    # the heads' plan differentiates through its steps; the study takes every gradient by Lyapunov
    sign = plan.backward or minimax_schedule(
        plan.lower * (1.0 - TARGET), 1.0 + TARGET, TARGET / 2, degrees=BACKWARD_DEGREES, backward=True
    )
    upstream = torch.randn(A.shape, generator=generator, dtype=torch.float64).float()
    return Case(name, A_hat, plan, sign, upstream)


def full_precision() -> AbstractContextManager[object]:
    """The hook of products in the working dtype's own precision (nothing changed)."""
    return contextlib.nullcontext()


def staged_root(
    A_hat: torch.Tensor, schedule: Schedule, low_steps: int, low: ProductHook
) -> tuple[torch.Tensor, torch.Tensor]:
    """The coupled iteration of ``schedule`` with its first ``low_steps`` steps in low precision and the
    rest in float32 (which finish the iteration but do not re-inject ``Â``). Shapes: ``(*, n, n)`` each."""
    if low_steps == 0:
        return coupled_root(A_hat, schedule)
    head = Schedule(schedule.steps[:low_steps], schedule.lower, schedule.upper, schedule.error)
    tail = Schedule(schedule.steps[low_steps:], schedule.lower, schedule.upper, schedule.error)
    with low():
        Y, Z = coupled_root(A_hat, head)
    return coupled_root(A_hat, tail, start=(Y, Z))


def staged_lyapunov(
    Y: torch.Tensor, G: torch.Tensor, schedule: Schedule, low_steps: int, low: ProductHook
) -> torch.Tensor:
    """``X`` with ``Y X + X Y = sym(G)`` by the sign iteration of ``schedule``, its first ``low_steps`` steps
    in low precision and the rest in float32. Shapes: ``(*, n, n)`` each."""
    shape = Y.shape
    B = Y.reshape(-1, shape[-2], shape[-1])
    C = symmetrize(G.reshape(-1, shape[-2], shape[-1]))
    last = len(schedule.steps) - 1
    for k, step in enumerate(schedule.steps):
        with low() if k < low_steps else contextlib.nullcontext():
            B2, T, B_next = operator_step(B, step.coefficients)
            B, C = B_next, rhs_step(B, B2, T, C, step.coefficients, 0.5 if k == last else 1.0)
    return C.reshape(shape)


Runner = Callable[[torch.Tensor, torch.Tensor, ProductHook], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""``(Â, G, low) -> (Y, Z, X)``."""


def configurations(case: Case) -> list[tuple[str, str, Runner, tuple[float, float] | None]]:
    """``(label, format, runner, modelled (forward, gradient) errors or None)`` of every configuration."""
    forward, sign = case.plan.forward, case.sign

    def staged(k: int, j: int) -> Runner:
        def run(A_hat: torch.Tensor, G: torch.Tensor, low: ProductHook) -> tuple[torch.Tensor, ...]:
            Y, Z = staged_root(A_hat, forward, k, low)
            return Y, Z, staged_lyapunov(Y, G, sign, j, low)

        return run

    def refine_forward(fmt: str, r: int) -> Runner:
        plan = mixed_plan(case.plan.lower, epsilon=EPSILON[fmt], refinements=r)

        def run(A_hat: torch.Tensor, G: torch.Tensor, low: ProductHook) -> tuple[torch.Tensor, ...]:
            Y, Z = mixed_sqrt(A_hat, plan, low)
            return Y, Z, staged_lyapunov(Y, G, sign, 0, low)

        return run

    def refine(fmt: str, r: int, s: int, margin: float) -> tuple[Runner, tuple[float, float]]:
        plan = mixed_plan(
            case.plan.lower,
            epsilon=EPSILON[fmt],
            refinements=r,
            backward_refinements=s,
            margin=margin,
        )

        def run(A_hat: torch.Tensor, G: torch.Tensor, low: ProductHook) -> tuple[torch.Tensor, ...]:
            Y, Z = mixed_sqrt(A_hat, plan, low)
            return Y, Z, mixed_lyapunov(Y, G, plan, low)

        n = case.A_hat.shape[-1]
        return run, mixed_error_bound(plan, n)

    rows: list[tuple[str, str, Runner, tuple[float, float] | None]] = [
        ("float32", "float32", staged(0, 0), None)
    ]
    steps, sign_steps = len(forward.steps), len(sign.steps)
    for fmt in ("tf32", "bf16"):
        rows.append(("all", fmt, staged(steps, sign_steps), None))
        for k in sorted({steps // 2, steps - 1}):
            rows.append((f"staged {k}/{sign_steps // 2}", fmt, staged(k, sign_steps // 2), None))
        for r, s, margin in (
            (1, 1, 0.01),
            (1, 1, 0.0),
            (2, 1, 0.01),
            (2, 2, 0.01),
            (3, 1, 0.01),
            (5, 2, 0.01),
        ):
            label = f"refine {r}/{s}" + ("" if margin else " margin 0")
            rows.append((label, fmt, *refine(fmt, r, s, margin)))
        rows.append(("refine 2/float32", fmt, refine_forward(fmt, 2), None))
    return rows


def mixed_rows(sizes: tuple[int, ...] = MIXED_SIZES, *, seed: int = 0, progress: bool = True) -> list[dict]:
    """One row per input set, size and configuration (see the module docstring)."""
    rows = []
    cases = [(name, n) for name in ("spd", "head") for n in sizes]
    for name, n in tqdm(cases, desc="mixed precision", disable=not progress, unit="input set"):
        case = make_case(name, n, seed=seed)
        exact_root = reference_root(case.A_hat)
        exact_inverse = reference_root(case.A_hat, inverse=True)
        exact_gradient = reference_gradient(case.A_hat, case.upstream)
        for label, fmt, run, model in configurations(case):
            lows: list[ProductCounter] = []

            def low(fmt: str = fmt, lows: list[ProductCounter] = lows) -> ProductCounter:
                lows.append(emulated_products(fmt))
                return lows[-1]

            # the float32 phases at full precision whatever torch's global setting (as in the roots)
            with ProductCounter() as total, products_in("full", torch.float32):
                Y, Z, X = run(case.A_hat, case.upstream, low if fmt != "float32" else full_precision)
            low_products = sum(mode.products for mode in lows)
            full_products = total.products - low_products
            row = {
                "input": name,
                "n": n,
                "config": label,
                "format": fmt,
                "low": low_products,
                "float32": full_products,
                "cost": full_products + low_products * COST[fmt],
                "forward": relative_error(Y, exact_root).max().item(),
                "inverse": relative_error(Z, exact_inverse).max().item(),
                "gradient": relative_error(X, exact_gradient).max().item(),
                "model_forward": model[0] if model else float("nan"),
                "model_gradient": model[1] if model else float("nan"),
            }
            row["meets"] = row["forward"] <= TARGET and row["gradient"] <= TARGET
            rows.append(row)
    return rows


def summary(rows: list[dict]) -> str:
    """Per input set, the cheapest low-precision configuration that meets the target on every size, and
    the cheapest with ten times room (forward, inverse and gradient <= target / 10), as a fraction of the
    float32 plan's cost."""
    lines = []
    for name in dict.fromkeys(row["input"] for row in rows):
        own = [row for row in rows if row["input"] == name]
        sizes = {row["n"] for row in own}
        for what, passes in (
            (f"forward and gradient <= {TARGET:g}", lambda row: row["meets"]),
            (
                f"forward, inverse and gradient <= {TARGET / 10:g}",
                lambda row: max(row["forward"], row["inverse"], row["gradient"]) <= TARGET / 10,
            ),
        ):
            costs = {}
            for key in dict.fromkeys(
                (row["config"], row["format"]) for row in own if row["format"] != "float32"
            ):
                cells = [row for row in own if (row["config"], row["format"]) == key]
                if len(cells) == len(sizes) and all(passes(row) for row in cells):
                    costs[key] = max(
                        row["cost"] / reference["cost"] for row, reference in _paired(cells, own)
                    )
            best = min(costs, key=costs.get, default=None)
            lines.append(
                f"{name}: no low-precision configuration has {what} on every size"
                if best is None
                else f"{name}: cheapest with {what}: {best[0]} in {best[1]}, at most {costs[best]:.2f} x the "
                "float32 plan's cost"
            )
    return "\n".join(lines)


def _paired(cells: list[dict], rows: list[dict]) -> list[tuple[dict, dict]]:
    """Each row of ``cells`` with the ``float32`` row of its size."""
    reference = {row["n"]: row for row in rows if row["config"] == "float32"}
    return [(row, reference[row["n"]]) for row in cells]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the study (``--help``), print its rows and summary, write its results; returns the rows."""
    args = parse(make_parser(__doc__, sizes=MIXED_SIZES), argv)
    rows = mixed_rows(tuple(args.sizes), seed=args.seed, progress=not args.no_progress)
    print(format_table(rows, list(rows[0])))
    print(summary(rows))
    write_rows(args, "mixed", rows)
    return rows


if __name__ == "__main__":
    main()
