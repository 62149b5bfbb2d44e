"""The measurements behind the TF32 plan's certificate: ``python examples/studies/tf32_fit.py``.

:func:`covpool.linalg.mixed.mixed_error_bound` and :func:`~covpool.linalg.mixed.mixed_valid_residual`
model the errors of ``RootOptions(precision="tf32")`` in ``t = ε / lower`` with constants fitted on
emulated TF32 runs (:mod:`covpool.linalg.emulation`). This study makes those runs: for every input family
of :func:`covpool.testing.bounded_matrices`, size and condition, the mtp plan assuming that condition
gives ``lower`` and the normalised float32 ``Â``; the mixed plan (two refinements and one correction, and
three and two) runs with every low-precision product emulated, and the errors of ``Y``, ``Z`` and the
Lyapunov gradient (Gaussian upstream) against float64 eigendecompositions, and the a-posteriori test's
value (:func:`covpool.linalg.iteration.mixed_residual`), are divided by the model's power of ``t``.
Condition 1e5 lies beyond the fitted range (``t > TF32_DOMAIN``) and shows why it ends there.

Prints the rows and, per ratio, the largest measured against the model's constant (the room); writes
``tf32_fit.csv``, ``tf32_fit.json`` and the figure ``tf32_fit.png`` under ``--out``
(``examples/results/``: the recorded results :data:`covpool.linalg.mixed.ROOT_GROWTH`,
:data:`~covpool.linalg.mixed.INVERSE_GROWTH`, :data:`~covpool.linalg.mixed.VALID_RESIDUAL_GROWTH` and
:data:`~covpool.linalg.mixed.TF32_DOMAIN` cite). The default sizes take about a minute on 2 cores.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from study import make_parser, normalised, parse, write_rows
from tqdm.auto import tqdm

from covpool.bench.report import format_table
from covpool.linalg.emulation import EPSILON, emulated_products
from covpool.linalg.iteration import mixed_residual
from covpool.linalg.mixed import (
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
REFINEMENTS = ((2, 1), (3, 2))
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
    sizes: tuple[int, ...] = FIT_SIZES, *, seeds: int = 2, first_seed: int = 0, progress: bool = True
) -> list[dict]:
    """One row per family, size, condition, seed (``seeds`` from ``first_seed``, one from n = 512) and
    refinement count: ``t``, the errors and their ratios to the model's powers of ``t`` (see the module
    docstring)."""
    grid = [
        (kind, n, condition, seed)
        for kind, n, condition in itertools.product(SPECTRUM_KINDS, sizes, CONDITIONS)
        for seed in range(first_seed, first_seed + (1 if n >= LARGE else seeds))
    ]
    low = lambda: emulated_products("tf32")  # noqa: E731
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
        for refinements, corrections in REFINEMENTS:
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
                    "t": t,
                    "fitted": t <= TF32_DOMAIN,
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


def fit_summary(rows: list[dict]) -> str:
    """Per ratio, the largest measured inside the fitted range against the model's constant (the room),
    and the worst gradient outside it."""
    inside = [row for row in rows if row["fitted"]]
    header = f"{'ratio':<12} {'measured max':>13} {'model':>8} {'room':>6}"
    lines = [f"{header}   (t <= {TF32_DOMAIN:g}, {len(inside)} rows)"]
    for ratio, constant in MODEL.items():
        worst = max(row[ratio] for row in inside)
        lines.append(f"{ratio:<12} {worst:>13.3g} {constant:>8.3g} {constant / worst:>6.1f}")
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
    """``path`` (PNG): each quantity of :data:`PANELS` against ``t`` on log scales, one colour per input
    family, the model's line, and the end of the fitted range (dashed); NaN results beyond it and exact
    zeros (no point on a log scale) are counted in the panel's title. Drawn with matplotlib's Agg canvas,
    without pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11.0, 8.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2).ravel()
    ts = [row["t"] for row in rows]
    line = [min(ts) / 1.2, max(ts) * 1.2]
    for axis, (column, title, power, constant) in zip(axes, PANELS, strict=True):
        for index, kind in enumerate(SPECTRUM_KINDS):
            chosen = [row for row in rows if row["kind"] == kind and row[column] > 0]  # NaN compares False
            axis.scatter(
                [row["t"] for row in chosen],
                [row[column] for row in chosen],
                s=14,
                color=f"C{index}",
                label=kind,
                alpha=0.7,
            )
        axis.plot(
            line, [constant * t**power for t in line], color="black", label=f"model {constant:g} t^{power}"
        )
        axis.axvline(TF32_DOMAIN, color="grey", linestyle="--", label=f"fitted range t <= {TF32_DOMAIN:g}")
        not_finite = sum(not math.isfinite(row[column]) for row in rows)
        zero = sum(row[column] == 0 for row in rows)
        notes = [f"{not_finite} NaN beyond the range"] * bool(not_finite) + [f"{zero} exactly 0"] * bool(zero)
        axis.set(xscale="log", yscale="log", xlabel="t = eps_TF32 / lower", ylabel="relative error")
        axis.set_title(title + (f" ({', '.join(notes)})" if notes else ""), fontsize=10)
        axis.legend(fontsize=7)
    figure.suptitle(
        "precision='tf32': emulated runs against the certificate's model (examples/studies/tf32_fit.py)"
    )
    figure.savefig(path, dpi=110)
    return path


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the study (``--help``), print its rows and summary, write its results; returns the rows."""
    parser = make_parser(__doc__, sizes=FIT_SIZES)
    parser.add_argument("--seeds", type=int, default=2, help="seeds below n = 512 (one from there)")
    args = parse(parser, argv)
    rows = fit_rows(tuple(args.sizes), seeds=args.seeds, first_seed=args.seed, progress=not args.no_progress)
    print(format_table(rows, list(rows[0])))
    print(fit_summary(rows))
    write_rows(args, "tf32_fit", rows)
    print(f"wrote {plot_fit(rows, args.out / 'tf32_fit.png')}")
    return rows


if __name__ == "__main__":
    main()
