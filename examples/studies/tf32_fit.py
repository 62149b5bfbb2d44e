"""The measurements behind the TF32 plan's certificate: ``python examples/studies/tf32_fit.py``.

:func:`covpool.linalg.mixed.mixed_error_bound` and :func:`~covpool.linalg.mixed.mixed_valid_residual`
model the errors of ``RootOptions(precision="tf32")`` in ``t = ε / lower`` with constants fitted on
emulated TF32 runs (:mod:`covpool.linalg.emulation`). This study makes those runs: for every input family
of :func:`covpool.testing.bounded_matrices`, size and condition, the mtp plan assuming that condition
gives ``lower`` and the normalised float32 ``Â``; the mixed plan (:data:`REFINEMENTS`: three refinements
and one correction, the default; three and two; and two and one, the default before the roundings were
fitted, which the certificate no longer covers) runs with every low-precision product emulated, once per
rounding of the TF32 operands the hardware may use (:data:`covpool.linalg.emulation.ROUNDINGS`: to nearest
with ties to even, with ties away from zero, truncation; ``--roundings``), and the errors of ``Y``, ``Z``
and the Lyapunov gradient (Gaussian upstream) against float64 eigendecompositions, and the a-posteriori test's
value (:func:`covpool.linalg.iteration.mixed_residual`), are divided by the model's power of ``t``.
Condition 1e5 lies beyond the fitted range (``t > TF32_DOMAIN``) and shows why it ends there.

The certificate holds for the worst rounding: every constant must keep at least :data:`REQUIRED_ROOM`
(2×) over the largest ratio measured under every rounding inside the fitted range, on the plans it
covers (column ``certified``: at least :data:`covpool.linalg.mixed.CERTIFIED_REFINEMENTS` refinements and
one correction). The plan 2/1 is
kept to show why it is not certified any more (the table ``room_2_1``).

Prints the rows and, per rounding and ratio, the largest measured against the model's constant (the room);
writes
``tf32_fit.csv``, ``tf32_fit.json`` and the figure ``tf32_fit.png`` under ``--out``
(``examples/results/``: the recorded results :data:`covpool.linalg.mixed.ROOT_GROWTH`,
:data:`~covpool.linalg.mixed.INVERSE_GROWTH`, :data:`~covpool.linalg.mixed.VALID_RESIDUAL_GROWTH` and
:data:`~covpool.linalg.mixed.TF32_DOMAIN` cite); the JSON's ``room`` table holds the per-rounding maxima
and rooms. The default sizes took 22 minutes on one thread of a busy 2-core machine (2026-12-07).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from study import make_parser, normalised, parse, write_rows
from tqdm.auto import tqdm

from covpool.bench.report import format_table
from covpool.linalg.emulation import EPSILON, ROUNDINGS, Rounding, emulated_products
from covpool.linalg.iteration import mixed_residual
from covpool.linalg.mixed import (
    CERTIFIED_REFINEMENTS,
    INVERSE_GROWTH,
    ROOT_GROWTH,
    TF32_DOMAIN,
    VALID_RESIDUAL_GROWTH,
    mixed_lyapunov,
    mixed_plan,
    mixed_sqrt,
)
from covpool.linalg.precision import products_in
from covpool.testing import (
    SPECTRUM_KINDS,
    bounded_matrices,
    reference_gradient,
    reference_root,
    relative_error,
)

FIT_SIZES = (32, 64, 128, 256, 512)
CONDITIONS = (1e2, 1e3, 1e4, 1e5)
REFINEMENTS = ((3, 1), (3, 2), (2, 1))
"""``(refinements, corrections)`` of the mixed plans run: the default, one correction more, one refinement
fewer."""
BATCH = 8
LARGE = 512
"""From this size one seed and batches of 3 (the emulated products cost minutes beyond)."""
PANELS = (
    ("root", "error of Y", 1, ROOT_GROWTH),
    ("inverse", "error of Z", 2, INVERSE_GROWTH),
    ("gradient", "gradient error", 2, INVERSE_GROWTH),
    ("residual", "a-posteriori test, valid input", 2, VALID_RESIDUAL_GROWTH),
)
"""Per quantity: its column, title, the model's power of ``t`` and constant."""
MODEL = {
    "root/t": ROOT_GROWTH,
    "inverse/t²": INVERSE_GROWTH,
    "gradient/t²": INVERSE_GROWTH,
    "residual/t²": VALID_RESIDUAL_GROWTH,
}
"""Each ratio's modelled constant."""
REQUIRED_ROOM = 2.0
"""Least room each constant must keep over the largest ratio of every rounding inside the fitted range."""


def normalised_case(
    kind: str, n: int, condition: float, batch: int, generator: torch.Generator
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """``batch`` :func:`covpool.testing.bounded_matrices` of ``kind`` at ``condition``, normalised as the
    mtp plan assuming that condition normalises them (float32 ``Â``); that plan's ``lower``; a Gaussian
    upstream gradient (float32). Shapes: ``(batch, n, n)``."""
    A = bounded_matrices(kind, batch, n, condition, generator)
    # the plan's bound and normalisation do not depend on tol; 1e-2 keeps float32's plan from being
    # refused at condition 1e5
    A_hat, plan = normalised(A, condition=condition, tol=1e-2)
    return A_hat, plan.lower, torch.randn(A.shape, generator=generator, dtype=torch.float64).float()


def fit_rows(
    sizes: tuple[int, ...] = FIT_SIZES,
    *,
    seeds: int = 2,
    first_seed: int = 0,
    roundings: Sequence[Rounding] = ROUNDINGS,
    progress: bool = True,
) -> list[dict]:
    """One row per family, size, condition, seed (``seeds`` from ``first_seed``, one from n = 512),
    refinement count and rounding of the TF32 operands: ``t``, the errors and their ratios to the model's
    powers of ``t`` (see the module docstring)."""
    grid = [
        (kind, n, condition, seed)
        for kind, n, condition in itertools.product(SPECTRUM_KINDS, sizes, CONDITIONS)
        for seed in range(first_seed, first_seed + (1 if n >= LARGE else seeds))
    ]
    rows = []
    for kind, n, condition, seed in tqdm(grid, desc="tf32 fit", disable=not progress, unit="case"):
        generator = torch.Generator().manual_seed(seed + 1)
        batch = 3 if n >= LARGE else BATCH
        A_hat, lower, upstream = normalised_case(kind, n, condition, batch, generator)
        exact = (
            reference_root(A_hat),
            reference_root(A_hat, inverse=True),
            reference_gradient(A_hat, upstream),
        )
        t = EPSILON["tf32"] / lower
        for rounding, (refinements, corrections) in itertools.product(roundings, REFINEMENTS):
            low = functools.partial(emulated_products, "tf32", rounding)
            mixed = mixed_plan(
                lower, epsilon=EPSILON["tf32"], refinements=refinements, backward_refinements=corrections
            )
            with products_in("full", torch.float32):  # float32 phases at full precision, as in the roots
                Y, Z = mixed_sqrt(A_hat, mixed, low)
                X = mixed_lyapunov(Y, upstream, mixed, low)
            root, inverse, gradient = (
                relative_error(M, reference).max().item()
                for M, reference in zip((Y, Z, X), exact, strict=True)
            )
            residual = mixed_residual(A_hat, Y, Z).max().item()
            rows.append(
                {
                    "kind": kind,
                    "n": n,
                    "condition": condition,
                    "seed": seed,
                    "plan": f"{refinements}/{corrections}",
                    "rounding": rounding,
                    "t": t,
                    "fitted": t <= TF32_DOMAIN,
                    # a plan the certificate covers (inside the fitted range)
                    "certified": refinements >= CERTIFIED_REFINEMENTS and corrections >= 1,
                    "root": root,
                    "inverse": inverse,
                    "gradient": gradient,
                    "residual": residual,
                    "root/t": root / t,
                    "inverse/t²": inverse / t**2,
                    "gradient/t²": gradient / t**2,
                    "residual/t²": residual / t**2,
                }
            )
    return rows


def room_table(rows: list[dict], *, certified: bool = True) -> list[dict]:
    """Per rounding (and ``"every"``, the worst of them) and ratio, inside the fitted range and on the
    certified plans (or, with ``certified=False``, the others): the largest measured, the row it comes
    from, the model's constant and the room (constant over largest)."""
    inside = [row for row in rows if row["fitted"] and row["certified"] == certified]
    if not inside:
        return []
    roundings = list(dict.fromkeys(row["rounding"] for row in inside))
    table = []
    for rounding in [*roundings, "every"]:
        chosen = [row for row in inside if rounding in ("every", row["rounding"])]
        for ratio, constant in MODEL.items():
            worst = max(chosen, key=lambda row: row[ratio])
            table.append(
                {
                    "rounding": rounding,
                    "ratio": ratio,
                    "measured": worst[ratio],
                    "model": constant,
                    "room": constant / worst[ratio],
                    "at": f"{worst['kind']} n={worst['n']} condition {worst['condition']:g} "
                    f"plan {worst['plan']} {worst['rounding']}",
                }
            )
    return table


def fit_summary(rows: list[dict]) -> str:
    """Per rounding and ratio, the largest measured inside the fitted range against the model's constant
    (the room; :data:`REQUIRED_ROOM` required), and the worst gradient outside it."""
    lines = []
    for certified in (True, False):
        inside = [row for row in rows if row["fitted"] and row["certified"] == certified]
        if not inside:
            continue
        plans = ", ".join(sorted({row["plan"] for row in inside}))
        header = f"{'rounding':<13} {'ratio':<12} {'measured max':>13} {'model':>8} {'room':>6}"
        lines.append(
            f"{'certified' if certified else 'not certified'} plans {plans}: t <= {TF32_DOMAIN:g}, "
            f"{len(inside)} rows" + (f", room >= {REQUIRED_ROOM:g} required" if certified else "")
        )
        lines.append(header)
        for entry in room_table(rows, certified=certified):
            short = certified and entry["room"] < REQUIRED_ROOM
            lines.append(
                f"{entry['rounding']:<13} {entry['ratio']:<12} {entry['measured']:>13.3g} "
                f"{entry['model']:>8.3g} {entry['room']:>6.2f}" + ("  < required" if short else "")
            )
    outside = [row for row in rows if not row["fitted"]]
    if outside:
        worst = max(outside, key=lambda row: math.inf if math.isnan(row["gradient"]) else row["gradient"])
        error = "NaN" if math.isnan(worst["gradient"]) else f"{worst['gradient']:.3g}"
        lines.append(
            f"beyond the range (t up to {max(row['t'] for row in outside):.2f}): gradient error up to "
            f"{error} ({worst['kind']}, n = {worst['n']}, condition {worst['condition']:g})"
        )
    return "\n".join(lines)


def plot_fit(rows: list[dict], path: Path) -> Path:
    """``path`` (PNG): for each quantity of :data:`PANELS` on the certified plans, its ratio to the model's
    power of ``t`` against ``t`` on log scales, one colour per rounding of the TF32 operands and one marker
    per input family; the model's constant (solid), the constant over :data:`REQUIRED_ROOM` that every point
    inside the fitted range must stay under (dotted), and the end of the fitted range (dashed). NaN results
    beyond it and exact zeros (no point on a log scale) are counted in the panel's title. Drawn with
    matplotlib's Agg canvas, without pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    figure = Figure(figsize=(12.0, 8.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2).ravel()
    plotted = [row for row in rows if row["certified"]]
    roundings = list(dict.fromkeys(row["rounding"] for row in rows))
    markers = dict(zip(SPECTRUM_KINDS, "o^s", strict=True))
    colours = {rounding: f"C{index}" for index, rounding in enumerate(roundings)}
    for axis, (column, title, power, constant) in zip(axes, PANELS, strict=True):
        ratio = f"{column}/{'t' if power == 1 else 't²'}"
        for rounding, kind in itertools.product(roundings, SPECTRUM_KINDS):
            chosen = [row for row in plotted if (row["rounding"], row["kind"]) == (rounding, kind)]
            chosen = [row for row in chosen if row[ratio] > 0]  # NaN compares False
            axis.scatter(
                [row["t"] for row in chosen],
                [row[ratio] for row in chosen],
                s=14,
                color=colours[rounding],
                marker=markers[kind],
                alpha=0.6,
            )
        axis.axhline(constant, color="black")
        axis.axhline(constant / REQUIRED_ROOM, color="black", linestyle=":")
        axis.axvline(TF32_DOMAIN, color="grey", linestyle="--")
        not_finite = sum(not math.isfinite(row[column]) for row in plotted)
        zero = sum(row[column] == 0 for row in plotted)
        notes = [f"{not_finite} NaN beyond the range"] * bool(not_finite) + [f"{zero} exactly 0"] * bool(zero)
        axis.set(
            xscale="log",
            yscale="log",
            xlabel="t = eps_TF32 / lower",
            ylabel=f"measured {column} error / t^{power}",
        )
        axis.xaxis.set_minor_formatter(NullFormatter())  # the minor ticks' labels overlap
        axis.set_title(title + (f" ({', '.join(notes)})" if notes else ""), fontsize=10)
        handles = [
            Line2D([], [], color=colours[rounding], marker="o", linestyle="", label=f"operands: {rounding}")
            for rounding in roundings
        ]
        handles += [
            Line2D([], [], color="grey", marker=markers[kind], linestyle="", label=f"input: {kind}")
            for kind in SPECTRUM_KINDS
        ]
        handles += [
            Line2D([], [], color="black", label=f"model's constant {constant:g}"),
            Line2D(
                [], [], color="black", linestyle=":", label=f"constant / {REQUIRED_ROOM:g} (required room)"
            ),
            Line2D([], [], color="grey", linestyle="--", label=f"fitted range t <= {TF32_DOMAIN:g}"),
        ]
        axis.legend(handles=handles, fontsize=7)
    figure.suptitle(
        "precision='tf32', certified plans "
        + ", ".join(sorted({row["plan"] for row in plotted}))
        + ": emulated runs per operand rounding against the certificate's constants "
        "(examples/studies/tf32_fit.py)"
    )
    figure.savefig(path, dpi=110)
    return path


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the study (``--help``), print its rows and summary, write its results; returns the rows."""
    parser = make_parser(__doc__, sizes=FIT_SIZES)
    parser.add_argument("--seeds", type=int, default=2, help="seeds below n = 512 (one from there)")
    parser.add_argument(
        "--roundings",
        nargs="+",
        choices=ROUNDINGS,
        default=list(ROUNDINGS),
        help="roundings of the TF32 operands (default: every one)",
    )
    args = parse(parser, argv)
    rows = fit_rows(
        tuple(args.sizes),
        seeds=args.seeds,
        first_seed=args.seed,
        roundings=args.roundings,
        progress=not args.no_progress,
    )
    print(format_table(rows, list(rows[0])))
    print(fit_summary(rows))
    write_rows(args, "tf32_fit", rows, room=room_table(rows), room_2_1=room_table(rows, certified=False))
    print(f"wrote {plot_fit(rows, args.out / 'tf32_fit.png')}")
    return rows


if __name__ == "__main__":
    main()
