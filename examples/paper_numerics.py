"""Numerical tests of the paper (Song, Sebe & Wang, ICLR 2022, section 5.1) at this machine's scale: relative
forward error, gradient error and forward+backward time of the matrix square root against the matrix size n
and the batch size, per configuration, dtype and condition number.

Configurations (keyword arguments of covpool.sqrtm / covpool.inv_sqrtm, with check_input=False; mtp and
mpa are also given condition=max(condition of the matrices, 1e3), the bound their schedules certify):

  eigh              exact eigendecomposition, Daleckii-Krein backward (the paper's SVD baseline)
  ns5               Newton-Schulz, 5 steps, autograd backward (iSQRT-COV)
  ns-matched        Newton-Schulz with the fewest steps whose forward and gradient errors both meet
                    --match-tol, searched per (function, dtype, condition, n) upward from the steps found at
                    the previous n (galloping, then bisection; assumes the error does not grow with steps)
  paper             covpool.PAPER_CONFIG: one Padé [5/5] after Frobenius normalisation, 8 backward iterations
  mpa, mtp          covpool's coupled Padé / Taylor iterations at their defaults, Lyapunov backward
  mpa tol=T, ...    the same with the schedule sized by tol=T, for every T of --tols

Inputs: random_spd(..., condition=c) (Haar eigenvectors, eigenvalues geometric from 1 to 1/c). Errors: the
largest relative Frobenius error over --error-batch matrices against float64 eigendecomposition references
(covpool.testing.reference_root / reference_gradient), the gradient being that of <G, A^(1/2)> for a fixed
Gaussian G; references are taken from the input as given, so float32 rounding of A is not counted as error.
Errors do not depend on the batch, so they are computed once per (configuration, function, dtype, condition,
n). Times: median over --repeats runs after --warmup of one forward+backward (CUDA synchronised), at the
condition --time-condition, against n at batch --time-batch, and against the batch at n = --batch-n.

Grid per device (each flag overrides its entry):

  cpu:  n = 16 ... 512, but float64 only up to n = 256 (float64 at n = 512 would add about as much
        time as all the rest on 2 cores, and shows nothing that float32 at 512 and float64 at 256 do
        not); time against n at batch 4 (one matrix of 512 already takes ~0.1-1 s); error batch 2;
        3 repeats.
  cuda: n = 16 ... 512 in both dtypes; time against n at batch 64; error batch 8; 5 repeats.
  both: sqrtm and inv_sqrtm; conditions 10, 1e2, 1e3, 1e4; dtypes float32, float64; batches 1, 4, 16,
        64, 256 at n = 64; time condition 1e3; tols 1e-2, 1e-5; --match-tol 1e-3.

Cells run from the smallest n up (errors, then times of that n), so a spent --time-budget leaves complete
comparisons at the sizes reached; the cells left out are listed. Writes into --out:
numerics_<device>_errors.csv, numerics_<device>_times.csv, numerics_<device>.json (both, the settings,
the ns-matched steps, the environment) and four plots, numerics_<device>_{forward_error, gradient_error,
time_vs_n, time_vs_batch}.png (log scales), and prints summary tables.

    python examples/paper_numerics.py                       # about 10-15 minutes on 2 CPU cores
    python examples/paper_numerics.py --device cuda         # the full grid on a GPU
    python examples/paper_numerics.py --sizes 64 256 --conditions 1e3 --dtypes float32
    python examples/paper_numerics.py --quick               # a few seconds: a smoke test, not results
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from common import (
    add_run_arguments,
    apply_run_arguments,
    command_line,
    environment,
    make_parser,
    write_results,
)

import covpool
from covpool.bench.budget import run_within_budget
from covpool.bench.report import format_table
from covpool.bench.timing import median_ms, upstream_gradient
from covpool.testing import random_spd, reference_gradient, reference_root, relative_error

MATCHED = "ns-matched"
FUNCTIONS = {"sqrtm": covpool.sqrtm, "inv_sqrtm": covpool.inv_sqrtm}
DEVICE_DEFAULTS: dict[str, dict] = {
    "cpu": {"float64_max_n": 256, "time_batch": 4, "error_batch": 2, "repeats": 3},
    "cuda": {"float64_max_n": 512, "time_batch": 64, "error_batch": 8, "repeats": 5},
}
QUICK = {
    "sizes": [16, 32],
    "batches": [1, 4],
    "conditions": [10.0, 1e3],
    "tols": [1e-2],
    "batch_n": 16,
    "time_batch": 4,
    "error_batch": 2,
    "repeats": 1,
    "warmup": 0,
}


def configurations(tols: Sequence[float]) -> dict[str, dict | None]:
    """Name -> keyword arguments of ``covpool.sqrtm``; ``None`` for ns-matched, whose steps are searched."""
    configs: dict[str, dict | None] = {
        "eigh": {"method": "eigh"},
        "ns5": {"method": "ns", "steps": 5},
        MATCHED: None,
        "paper": dict(covpool.PAPER_CONFIG),
        "mpa": {"method": "mpa"},
        "mtp": {"method": "mtp"},
    }
    for tol in tols:
        for method in ("mpa", "mtp"):
            configs[f"{method} tol={tol:g}"] = {"method": method, "tol": tol}
    return configs


@dataclass(frozen=True)
class Cell:
    """One measurement: the errors (``batch`` 0) or the time (``batch`` >= 1) of a configuration."""

    config: str
    function: str
    dtype: str
    condition: float
    n: int
    batch: int = 0

    @property
    def kind(self) -> str:
        return "time" if self.batch else "error"

    def label(self) -> str:
        where = f"b={self.batch}" if self.batch else f"cond={self.condition:g}"
        return f"{self.kind} {self.config} {self.function} {self.dtype} n={self.n} {where}"


def plan(args: argparse.Namespace, configs: Sequence[str]) -> list[Cell]:
    """Cells in run order: by n, then dtype; at each, the errors of every condition, then the times."""
    cells = []
    for n in sorted(args.sizes):
        for dtype in args.dtypes:
            if dtype == "float64" and n > args.float64_max_n:
                continue
            for function in args.functions:
                for condition in args.conditions:
                    cells += [Cell(config, function, dtype, condition, n) for config in configs]
            batches = sorted({args.time_batch} | (set(args.batches) if n == args.batch_n else set()))
            for function in args.functions:
                for batch in batches:
                    cells += [
                        Cell(config, function, dtype, args.time_condition, n, batch) for config in configs
                    ]
    return cells


def fewest_steps(error: Callable[[int], float], *, start: int, tol: float, cap: int) -> tuple[int, bool]:
    """The fewest steps ``s`` in ``[start, cap]`` with ``error(s) <= tol`` and True, or ``(cap, False)``.

    ``start - 1`` steps are assumed not to meet ``tol`` (they did not at the previous, smaller n) and
    ``error`` not to grow with the steps. The search gallops (``start``, ``+1``, ``+2``, ``+4``, ...) to the
    first success, then bisects, so it costs about ``2 log2(steps - start)`` evaluations.

    Example:
        >>> fewest_steps(lambda s: 2.0**-s, start=1, tol=1e-3, cap=40)
        (10, True)
        >>> fewest_steps(lambda s: 1.0, start=1, tol=1e-3, cap=40)
        (40, False)
    """
    failed, jump, steps = start - 1, 1, start
    while error(steps) > tol:
        if steps >= cap:
            return cap, False
        failed, steps, jump = steps, min(cap, steps + jump), 2 * jump
    while steps - failed > 1:
        middle = (failed + steps) // 2
        if error(middle) <= tol:
            steps = middle
        else:
            failed = middle
    return steps, True


def spd(count: int, n: int, condition: float, dtype: str, device: torch.device, seed: int) -> torch.Tensor:
    """``random_spd`` drawn on the CPU from ``seed`` (the same matrices on every device), then moved."""
    generator = torch.Generator().manual_seed(seed)
    A = random_spd(count, n=n, condition=condition, generator=generator)
    return A.to(device=device, dtype=getattr(torch, dtype))


class Runner:
    """Measures cells in plan order, caching inputs, references and the ns-matched steps between them."""

    def __init__(self, args: argparse.Namespace, configs: dict[str, dict | None]) -> None:
        self.args = args
        self.configs = configs
        self.matched: dict[tuple, dict] = {}  # (function, dtype, condition, n) -> {"steps", "met"}
        self._problem: tuple[tuple, tuple] | None = None  # latest error problem: key, tensors
        self._timing: tuple[tuple, torch.Tensor] | None = None  # latest timing input: key, A

    def kwargs(self, cell: Cell) -> dict:
        """Keyword arguments of ``cell``'s configuration (ns-matched: its searched steps)."""
        if cell.config != MATCHED:
            config = {**self.configs[cell.config], "check_input": False}
            if config.get("method") in ("mtp", "mpa") and "steps" not in config:
                # The certified schedules are told the condition number of the test matrices, as a user
                # who knows it (or adds a ridge) would; beyond the assumed bound they return NaN.
                config["condition"] = max(float(cell.condition), 1e3)
            return config
        found = self.matched.get((cell.function, cell.dtype, cell.condition, cell.n))
        if found is None:
            raise RuntimeError("no ns-matched steps: its error cell did not run")
        return {"method": "ns", "steps": found["steps"], "check_input": False}

    def problem(self, cell: Cell) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A, G, exact root, exact gradient)`` of ``cell``'s error problem."""
        key = (cell.function, cell.dtype, cell.condition, cell.n)
        if self._problem is None or self._problem[0] != key:
            A = spd(self.args.error_batch, cell.n, cell.condition, cell.dtype, self.args.device, seed=1)
            G = upstream_gradient(A, seed=2)
            inverse = cell.function == "inv_sqrtm"
            exact = reference_root(A, inverse=inverse), reference_gradient(A, G, inverse=inverse)
            self._problem = key, (A, G, *exact)
        return self._problem[1]

    def errors(self, cell: Cell, kwargs: dict) -> tuple[float, float]:
        """Largest relative forward and gradient errors of ``kwargs`` on ``cell``'s problem."""
        A, G, exact, exact_grad = self.problem(cell)
        A = A.detach().requires_grad_()
        out = FUNCTIONS[cell.function](A, **kwargs)
        (grad,) = torch.autograd.grad(out, A, G)
        return relative_error(out.detach(), exact).max().item(), relative_error(grad, exact_grad).max().item()

    def search(self, cell: Cell) -> tuple[float, float]:
        """Find and store the ns-matched steps of ``cell``; returns their errors."""
        seen: dict[int, tuple[float, float]] = {}

        def error(steps: int) -> float:
            seen[steps] = self.errors(cell, {"method": "ns", "steps": steps, "check_input": False})
            return max(seen[steps])

        smaller = [
            v["steps"]
            for k, v in self.matched.items()
            if k[:3] == (cell.function, cell.dtype, cell.condition) and k[3] < cell.n
        ]
        start = max(smaller, default=1)
        steps, met = fewest_steps(error, start=start, tol=self.args.match_tol, cap=self.args.ns_max_steps)
        self.matched[(cell.function, cell.dtype, cell.condition, cell.n)] = {"steps": steps, "met": met}
        return seen[steps]

    def time_ms(self, cell: Cell, kwargs: dict) -> float:
        """Median forward+backward milliseconds of ``kwargs`` on ``cell``'s timing batch."""
        key = (cell.dtype, cell.n, cell.batch)
        if self._timing is None or self._timing[0] != key:
            A = spd(cell.batch, cell.n, cell.condition, cell.dtype, self.args.device, seed=0)
            self._timing = key, A.requires_grad_()
        A, function = self._timing[1], FUNCTIONS[cell.function]
        with torch.no_grad():
            G = upstream_gradient(function(A, **kwargs))
        return median_ms(
            lambda: torch.autograd.grad(function(A, **kwargs), A, G),
            device=A.device,
            warmup=self.args.warmup,
            repeats=self.args.repeats,
        )

    def __call__(self, cell: Cell) -> dict:
        """The row of ``cell``: its coordinates, ``steps`` where the configuration sets them, its figures; a
        configuration whose plan refuses the cell's ``tol`` (float32 at ``tol=1e-5`` beyond the sizes the
        residual test can certify) gives a row that says so."""
        try:
            return self._row(cell)
        except ValueError as refusal:
            if "cannot be certified" not in str(refusal):
                raise
            return failed_row(cell, f"refused: {refusal}")

    def _row(self, cell: Cell) -> dict:
        if cell.kind == "error" and cell.config == MATCHED:
            forward, gradient = self.search(cell)
        kwargs = self.kwargs(cell)
        row = {**asdict(cell), "kind": cell.kind, "steps": kwargs.get("steps"), "note": ""}
        if cell.kind == "time":
            return {**row, "forward_backward_ms": self.time_ms(cell, kwargs)}
        if cell.config == MATCHED:
            if not self.matched[(cell.function, cell.dtype, cell.condition, cell.n)]["met"]:
                row["note"] = f"--match-tol not met with {row['steps']} steps"
        else:
            forward, gradient = self.errors(cell, kwargs)
        return {**row, "forward_error": forward, "gradient_error": gradient}


def failed_row(cell: Cell, message: str) -> dict:
    """The row of a cell that raised: its coordinates, NaN figures and the message."""
    figures = (
        {"forward_backward_ms": math.nan}
        if cell.batch
        else {"forward_error": math.nan, "gradient_error": math.nan}
    )
    return {**asdict(cell), "kind": cell.kind, "steps": None, "note": message, **figures}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = make_parser(__doc__)
    grid = parser.add_argument_group("grid (default: the device's row in the table above)")
    grid.add_argument("--sizes", nargs="+", type=int, default=[16, 32, 64, 128, 256, 512], help="n")
    grid.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 64, 256], help="time vs batch")
    grid.add_argument("--batch-n", type=int, default=64, help="n of the time-vs-batch measurements")
    grid.add_argument(
        "--time-batch", type=int, default=None, help="batch of the time-vs-n measurements (cpu 4, cuda 64)"
    )
    grid.add_argument("--conditions", nargs="+", type=float, default=[10.0, 1e2, 1e3, 1e4], help="of A")
    grid.add_argument("--time-condition", type=float, default=1e3, help="condition of the timed inputs")
    grid.add_argument(
        "--dtypes", nargs="+", choices=("float32", "float64"), default=["float32", "float64"], help="dtypes"
    )
    grid.add_argument(
        "--functions", nargs="+", choices=tuple(FUNCTIONS), default=list(FUNCTIONS), help="roots"
    )
    grid.add_argument(
        "--float64-max-n", type=int, default=None, help="largest n measured in float64 (cpu 256, cuda 512)"
    )
    grid.add_argument("--tols", nargs="*", type=float, default=[1e-2, 1e-5], help="tol of the mpa/mtp runs")
    grid.add_argument("--match-tol", type=float, default=1e-3, help="error that ns-matched must meet")
    grid.add_argument("--ns-max-steps", type=int, default=40, help="most ns-matched steps tried")
    grid.add_argument(
        "--error-batch", type=int, default=None, help="matrices per error measurement (cpu 2, cuda 8)"
    )
    grid.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    grid.add_argument("--repeats", type=int, default=None, help="timed runs, median kept (cpu 3, cuda 5)")
    add_run_arguments(parser, time_budget=1200.0)
    args = parser.parse_args(argv)
    defaults = DEVICE_DEFAULTS["cuda" if args.device.type == "cuda" else "cpu"]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.time_condition not in args.conditions:
        parser.error(
            f"--time-condition {args.time_condition:g} must be one of --conditions {args.conditions}"
        )
    return args


def plot_errors(rows: list[dict], args: argparse.Namespace, quantity: str, path: Path, styles: dict) -> Path:
    """``quantity`` error against n: one panel per (function, dtype) row and condition column."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(function, dtype) for function in args.functions for dtype in args.dtypes]
    figure = Figure(figsize=(3.6 * len(args.conditions) + 2.2, 3.0 * len(panels) + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(panels), len(args.conditions), squeeze=False, sharex=True, sharey=True)
    for (function, dtype), row_axes in zip(panels, axes, strict=True):
        for condition, ax in zip(args.conditions, row_axes, strict=True):
            for config, style in styles.items():
                points = sorted(
                    (r["n"], r[quantity], r["steps"])
                    for r in rows
                    if r["kind"] == "error"
                    and (r["config"], r["function"], r["dtype"], r["condition"])
                    == (config, function, dtype, condition)
                    and math.isfinite(r[quantity])
                )
                if not points:
                    continue
                ns, values, steps = zip(*points, strict=True)
                ax.plot(ns, [max(v, 1e-17) for v in values], label=config, **style)
                if config == MATCHED:  # the searched step counts, next to their points
                    for n, value, count in points:
                        ax.annotate(
                            str(count),
                            (n, max(value, 1e-17)),
                            xytext=(2, 3),
                            textcoords="offset points",
                            fontsize=6,
                            color=style["color"],
                        )
            ax.axhline(args.match_tol, color="grey", linewidth=0.6, linestyle=":")
            ax.set(yscale="log", title=f"{function} {dtype}, condition {condition:g}")
            _log2_axis(ax, args.sizes)
            ax.grid(True, which="major", alpha=0.25)
        row_axes[0].set_ylabel(f"{quantity.replace('_', ' ')} (max rel.)")
    for ax in axes[-1]:
        ax.set_xlabel("n")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.suptitle(
        f"{quantity.replace('_', ' ')} against n, {args.device.type}\n"
        f"dotted: --match-tol {args.match_tol:g}; numbers: ns-matched steps",
        fontsize=10,
    )
    figure.savefig(path, dpi=100)
    return path


def _log2_axis(ax, ticks: Sequence[int]) -> None:
    """A base-2 log x axis labelled with the measured values themselves (16, 32, ... rather than 2^4)."""
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks), [str(tick) for tick in sorted(ticks)])
    ax.xaxis.set_minor_locator(NullLocator())


def plot_times(rows: list[dict], args: argparse.Namespace, against: str, path: Path, styles: dict) -> Path:
    """Forward+backward time against ``against`` ("n" or "batch"): one panel per function and dtype."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fixed = ("batch", args.time_batch) if against == "n" else ("n", args.batch_n)
    figure = Figure(
        figsize=(4.2 * len(args.dtypes) + 2.2, 3.4 * len(args.functions) + 0.6), layout="constrained"
    )
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(args.functions), len(args.dtypes), squeeze=False)
    for function, row_axes in zip(args.functions, axes, strict=True):
        for dtype, ax in zip(args.dtypes, row_axes, strict=True):
            for config, style in styles.items():
                points = sorted(
                    (r[against], r["forward_backward_ms"])
                    for r in rows
                    if r["kind"] == "time"
                    and (r["config"], r["function"], r["dtype"], r[fixed[0]])
                    == (config, function, dtype, fixed[1])
                    and math.isfinite(r["forward_backward_ms"])
                )
                if points:
                    ax.plot(*zip(*points, strict=True), label=config, **style)
            ax.set(
                yscale="log",
                xlabel=against,
                ylabel="forward+backward ms",
                title=f"{function} {dtype}, {fixed[0]} = {fixed[1]}",
            )
            _log2_axis(ax, args.sizes if against == "n" else args.batches)
            ax.grid(True, which="both", alpha=0.25)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.suptitle(
        f"forward+backward time against {against}, {args.device.type}\n"
        f"condition {args.time_condition:g}, median of {args.repeats}",
        fontsize=10,
    )
    figure.savefig(path, dpi=100)
    return path


def line_styles(configs: Sequence[str], tols: Sequence[float]) -> dict[str, dict]:
    """A colour per method and a dash per tol, so that the tol runs of mpa and mtp read as families."""
    colours = {"eigh": "C0", "ns5": "C1", MATCHED: "C2", "paper": "C3", "mpa": "C4", "mtp": "C5"}
    dashes = ["--", ":", "-."]
    styles = {}
    for config in configs:
        method, _, tol = config.partition(" tol=")
        dash = dashes[[f"{t:g}" for t in tols].index(tol) % len(dashes)] if tol else "-"
        styles[config] = {
            "color": colours[method],
            "linestyle": dash,
            "marker": "o",
            "markersize": 3,
            "linewidth": 1.2,
        }
    return styles


def summary_tables(rows: list[dict], args: argparse.Namespace, configs: Sequence[str]) -> str:
    """Errors at the largest n reached (forward / gradient, per condition) and times against n."""
    blocks = []
    for function in args.functions:
        for dtype in args.dtypes:
            errors = [r for r in rows if (r["kind"], r["function"], r["dtype"]) == ("error", function, dtype)]
            if not errors:
                continue
            n = max(r["n"] for r in errors)
            table = []
            for config in configs:
                line = {"config": config}
                for condition in args.conditions:
                    for r in errors:
                        if (r["config"], r["n"], r["condition"]) == (config, n, condition):
                            steps = f" ({r['steps']})" if config == MATCHED else ""
                            line[f"cond {condition:g}"] = (
                                f"{r['forward_error']:.1e} / {r['gradient_error']:.1e}{steps}"
                            )
                table.append(line)
            columns = ["config", *(f"cond {c:g}" for c in args.conditions)]
            blocks.append(
                f"{function} {dtype}, n = {n}: forward / gradient error (ns-matched steps)\n"
                + format_table(table, columns)
            )
            times = [
                r
                for r in rows
                if (r["kind"], r["function"], r["dtype"], r["batch"])
                == ("time", function, dtype, args.time_batch)
            ]
            sizes = sorted({r["n"] for r in times})
            table = [
                {
                    "config": config,
                    **{f"n={r['n']}": r["forward_backward_ms"] for r in times if r["config"] == config},
                }
                for config in configs
            ]
            blocks.append(
                f"{function} {dtype}, batch {args.time_batch}: forward+backward ms\n"
                + format_table(table, ["config", *(f"n={n}" for n in sizes)])
            )
    return "\n\n".join(blocks)


def main(argv: list[str] | None = None) -> dict:
    """Measure the grid, write the results and plots, print the tables; returns the JSON payload."""
    args = parse_args(argv)
    apply_run_arguments(args)
    start = time.perf_counter()
    configs = configurations(args.tols)
    cells = plan(args, list(configs))
    runner = Runner(args, configs)
    rows, skipped = run_within_budget(
        cells,
        runner,
        failed_row,
        label=Cell.label,
        time_budget=args.time_budget,
        progress=not args.no_progress,
        desc="paper_numerics",
    )
    error_keys = (
        "config",
        "function",
        "dtype",
        "condition",
        "n",
        "steps",
        "forward_error",
        "gradient_error",
        "note",
    )
    time_keys = (
        "config",
        "function",
        "dtype",
        "condition",
        "n",
        "batch",
        "steps",
        "forward_backward_ms",
        "note",
    )
    tables = {
        "errors": [{k: r[k] for k in error_keys} for r in rows if r["kind"] == "error"],
        "times": [{k: r[k] for k in time_keys} for r in rows if r["kind"] == "time"],
    }
    stem = f"numerics_{args.device.type}"
    settings = {key: value for key, value in vars(args).items() if key not in ("device", "out")}
    payload = {
        "script": "examples/paper_numerics.py",
        "command": command_line("examples/paper_numerics.py", argv),
        "environment": environment(args.device),
        "settings": settings,
        "configurations": configs,
        "ns_matched_steps": [
            {"function": k[0], "dtype": k[1], "condition": k[2], "n": k[3], **v}
            for k, v in runner.matched.items()
        ],
        "total_time_s": time.perf_counter() - start,
        "skipped": [cell.label() for cell in skipped],
    }
    write_results(args.out, stem, tables, payload)
    styles = line_styles(list(configs), args.tols)
    for quantity in ("forward_error", "gradient_error"):
        plot_errors(rows, args, quantity, args.out / f"{stem}_{quantity}.png", styles)
    for against in ("n", "batch"):
        plot_times(rows, args, against, args.out / f"{stem}_time_vs_{against}.png", styles)
    print(summary_tables(rows, args, list(configs)))
    if skipped:
        print(
            f"time budget of {args.time_budget:.0f} s spent; {len(skipped)} cells not run, from "
            f"{skipped[0].label()}"
        )
    print(f"total {payload['total_time_s']:.0f} s; wrote {stem}_* into {Path(args.out)}")
    return {**payload, **tables}


if __name__ == "__main__":
    main(sys.argv[1:])
