"""Command line of the benchmark:
``python -m covpool.bench [--quick | --layers | --trace | --compile | --host | --deploy] [options]``."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

import covpool
import covpool.bench
from covpool.bench.compile import COMPILE_BACKENDS, format_compile, measure_compile
from covpool.bench.configs import CONFIGS
from covpool.bench.deploy import DEPLOY_BATCHES, DEPLOY_MODELS, run_deploy
from covpool.bench.grid import FUNCTIONS, comparison_label, describe_missing, plan_grid, run_grid
from covpool.bench.host import HOST_BATCH, HOST_SIZES, host_rows
from covpool.bench.layers import LAYER_CASES, LAYER_METHODS, run_layers
from covpool.bench.plot import plot_pareto
from covpool.bench.ranking import MAX_SPREAD
from covpool.bench.report import format_comparisons, format_table, record, write_csv, write_json
from covpool.bench.trace import trace_root

FULL_SIZES = (32, 64, 128, 256, 512)
FULL_BATCHES = (1, 16, 64, 256)
QUICK_SIZES = (64, 128)
QUICK_BATCHES = (64,)
FULL_BUDGET_S = 3600.0
QUICK_BUDGET_S = 180.0
QUICK_REPEATS = 3
FULL_REPEATS = 5
DTYPES = ("float32", "float64", "float16", "bfloat16")

ROOT_COLUMNS = (
    "config",
    "runs",
    "forward ms",
    "forward+backward ms",
    "spread",
    "rank",
    "saved_mib",
    "peak_mib",
    "forward_error",
    "gradient_error",
    "note",
)
"""Printed columns of the matrix-root grid; function, device, dtype, n and batch head each block."""
LAYER_COLUMNS = (
    "method",
    "runs",
    "input",
    "forward ms",
    "forward+backward ms",
    "spread",
    "rank",
    "saved_mib",
    "peak_mib",
    "note",
)
"""Printed columns of the layer benchmark; layer, device and dtype head each block."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _device(text: str) -> str:
    device = torch.device(text)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} requested but torch.cuda.is_available() is False")
    return str(device)


def build_parser() -> argparse.ArgumentParser:
    """The ``covpool-bench`` (also ``python -m covpool.bench``) argument parser; its epilog is
    :mod:`covpool.bench`'s docstring."""
    default_devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    parser = argparse.ArgumentParser(
        prog="covpool-bench",
        description="Time, memory and accuracy of covpool's matrix roots (default) or layers (--layers).",
        epilog=covpool.bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    grid = parser.add_argument_group("matrix-root grid")
    grid.add_argument(
        "--quick",
        action="store_true",
        help=f"small grid for a first look: --sizes {' '.join(map(str, QUICK_SIZES))} "
        f"--batches {' '.join(map(str, QUICK_BATCHES))} --repeats {QUICK_REPEATS}, "
        f"budget {QUICK_BUDGET_S:.0f} s (flags given explicitly win)",
    )
    grid.add_argument(
        "--sizes",
        type=_positive_int,
        nargs="+",
        metavar="N",
        help=f"matrix sizes n (default {' '.join(map(str, FULL_SIZES))})",
    )
    grid.add_argument(
        "--batches",
        type=_positive_int,
        nargs="+",
        metavar="B",
        help=f"batch sizes (default {' '.join(map(str, FULL_BATCHES))})",
    )
    grid.add_argument(
        "--configs",
        nargs="+",
        choices=list(CONFIGS),
        default=list(CONFIGS),
        metavar="NAME",
        help="configurations, by name (default all): " + ", ".join(CONFIGS),
    )
    grid.add_argument(
        "--function",
        choices=("sqrtm", "inv_sqrtm", "both"),
        default="both",
        help="which root to benchmark (default both)",
    )
    grid.add_argument(
        "--condition", type=float, default=1e3, help="condition number of the random SPD inputs (default 1e3)"
    )
    grid.add_argument(
        "--error-batch",
        type=_positive_int,
        default=8,
        metavar="B",
        help="matrices on which the errors are measured (default 8)",
    )

    layers = parser.add_argument_group("layers")
    layers.add_argument(
        "--layers", action="store_true", help="benchmark the layers instead of the matrix roots"
    )
    layers.add_argument(
        "--layer-names",
        nargs="+",
        choices=list(LAYER_CASES),
        default=list(LAYER_CASES),
        metavar="NAME",
        help="layers (default all): " + ", ".join(LAYER_CASES),
    )
    layers.add_argument(
        "--layer-methods",
        nargs="+",
        choices=covpool.METHODS,
        default=list(LAYER_METHODS),
        metavar="METHOD",
        help=f"root methods per layer (default {' '.join(LAYER_METHODS)})",
    )

    trace = parser.add_argument_group("trace")
    trace.add_argument(
        "--trace",
        action="store_true",
        help="count host syncs, matrix products and kernels of the CUDA path on fake tensors (no GPU needed)",
    )

    overhead = parser.add_argument_group("overhead")
    overhead.add_argument(
        "--compile",
        action="store_true",
        help="time torch.compile of a conv + CovPoolHead model (caches off) and count its frames, graphs "
        "and graph breaks",
    )
    overhead.add_argument(
        "--compile-backend",
        choices=COMPILE_BACKENDS,
        default=COMPILE_BACKENDS[0],
        help=f"with --compile: torch.compile's backend (default {COMPILE_BACKENDS[0]}; eager: dynamo alone)",
    )
    overhead.add_argument(
        "--host",
        action="store_true",
        help="host time of eager sqrtm calls on CPU: median per call, operators per call, options and plan "
        f"(--sizes default {' '.join(map(str, HOST_SIZES))}, --batches default {HOST_BATCH})",
    )

    deploy = parser.add_argument_group("deployment")
    deploy.add_argument(
        "--deploy",
        action="store_true",
        help="export a model to ONNX and time ONNX Runtime against eager PyTorch on CPU "
        f"(needs covpool[export]; --batches default {' '.join(map(str, DEPLOY_BATCHES))})",
    )
    deploy.add_argument(
        "--deploy-model",
        choices=DEPLOY_MODELS,
        default=DEPLOY_MODELS[0],
        help=f"registered model to export (default {DEPLOY_MODELS[0]}, 1000 classes, its default input size)",
    )

    common = parser.add_argument_group("all parts")
    common.add_argument(
        "--devices",
        type=_device,
        nargs="+",
        default=default_devices,
        metavar="DEVICE",
        help=f"devices, e.g. cpu cuda cuda:1 (default {' '.join(default_devices)})",
    )
    common.add_argument(
        "--dtype",
        nargs="+",
        choices=DTYPES,
        default=["float32"],
        metavar="DTYPE",
        help=f"dtypes, of {', '.join(DTYPES)} (default float32)",
    )
    common.add_argument(
        "--repeats",
        type=_positive_int,
        help=f"timed runs per cell, interleaved with the other configurations of its comparison; min, median "
        f"and max reported (default {FULL_REPEATS}, {QUICK_REPEATS} with --quick)",
    )
    common.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    common.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help=f"soft limit: start no new comparison after this many seconds; a started one finishes, and "
        f"the cells not run are listed as missing (default {FULL_BUDGET_S:.0f}, "
        f"{QUICK_BUDGET_S:.0f} with --quick)",
    )
    common.add_argument(
        "--out",
        type=Path,
        default=Path("bench_results"),
        metavar="DIR",
        help="output folder for CSV, JSON and PNG (default bench_results/)",
    )
    common.add_argument("--seed", type=int, default=0, help="seed of the inputs and upstream gradients")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _print_summary(
    verdicts: Sequence[dict], missing: Sequence, details: str, budget: float, elapsed: float
) -> None:
    """The loud part: missing cells with their reasons, comparisons not rankable, the budget used."""
    if missing:
        print(f"MISSING: {len(missing)} cell(s) without measurements (rows with a note in the CSV/JSON):")
        print(details)
    unranked = [v for v in verdicts if not v["rankable"] and v["reason"] != "nothing timed"]
    if unranked:
        print(
            f"WARNING: {len(unranked)} of {len(verdicts)} comparison(s) NOT RANKABLE (spread of the repeats "
            f"above {MAX_SPREAD:g}x, or inconsistent times): read no order into their times; rerun on an "
            "idle machine or with more --repeats"
        )
    over = f", {elapsed - budget:.0f} s over (a started comparison finishes)" if elapsed > budget else ""
    print(f"time budget {budget:g} s (soft): measured for {elapsed:.1f} s{over}")


def run_roots(args: argparse.Namespace) -> None:
    """The matrix-root grid: table on stdout, ``roots.csv``, ``roots.json``, ``pareto_*.png`` in ``--out``."""
    functions = list(FUNCTIONS) if args.function == "both" else [args.function]
    cells, unsupported = plan_grid(
        configs=args.configs,
        functions=functions,
        devices=args.devices,
        dtypes=args.dtype,
        sizes=args.sizes,
        batches=args.batches,
    )
    result = run_grid(
        cells,
        condition=args.condition,
        warmup=args.warmup,
        repeats=args.repeats,
        error_batch=args.error_batch,
        time_budget=args.time_budget,
        seed=args.seed,
        progress=not args.no_progress,
    )
    write_csv(result.rows, args.out / "roots.csv")
    write_json(
        {
            **record(args),
            "max_spread": MAX_SPREAD,
            "rows": result.rows,
            "comparisons": result.comparisons,
            "missing": [{"cell": cell.label(), "reason": reason} for cell, reason in result.missing],
            "unsupported": [cell.label() for cell in unsupported],
        },
        args.out / "roots.json",
    )
    figures = plot_pareto(result.rows, result.comparisons, args.out)
    columns = [c for c in ROOT_COLUMNS if c != "peak_mib" or any(d.startswith("cuda") for d in args.devices)]
    labels = [
        comparison_label(*(v[k] for k in ("function", "device", "dtype", "n", "batch")))
        for v in result.comparisons
    ]
    print(format_comparisons(result.rows, result.comparisons, columns, labels))
    if unsupported:
        names = sorted({cell.config for cell in unsupported})
        print(f"not run: {len(unsupported)} inv_sqrtm cell(s) of {', '.join(names)} (square root only)")
    _print_summary(
        result.comparisons,
        result.missing,
        describe_missing(result.missing),
        args.time_budget,
        result.elapsed_s,
    )
    print(
        f"wrote {args.out / 'roots.csv'}, {args.out / 'roots.json'} and {len(figures)} figure(s): "
        + ", ".join(path.name for path in figures)
    )


def run_trace(args: argparse.Namespace) -> None:
    """Print syncs, products and kernels of every configuration's CUDA path, forward+backward."""
    print("configuration       function    n  batch  syncs  products  kernels  kernels/product")
    for name in args.configs:
        config = CONFIGS[name]
        for function in FUNCTIONS if args.function == "both" else [args.function]:
            inverse = function == "inv_sqrtm"
            if inverse and not config.has_inverse:
                continue
            for n in args.sizes:
                for batch in args.batches:
                    try:
                        result = trace_root(lambda a, c=config, i=inverse: c.root(a, i), n=n, batch=batch)
                    except Exception as error:  # noqa: BLE001 - a peer that cannot be traced is reported
                        print(f"{name:18s}  {function:9s} {n:4d}  {batch:5d}  cannot be traced: {error}")
                        continue
                    kernels = result.forward.kernels + result.backward.kernels
                    print(
                        f"{name:18s}  {function:9s} {n:4d}  {batch:5d}  {result.syncs:5d}  "
                        f"{result.products:8.0f}  {kernels:7d}  {result.kernels_per_product:15.2f}"
                    )


def run_layer_benchmark(args: argparse.Namespace) -> None:
    """The layer benchmark: table on stdout, ``layers.csv`` and ``layers.json`` in ``--out``."""
    result, verdicts = run_layers(
        layers=args.layer_names,
        methods=args.layer_methods,
        devices=args.devices,
        dtypes=args.dtype,
        warmup=args.warmup,
        repeats=args.repeats,
        time_budget=args.time_budget,
        seed=args.seed,
        progress=not args.no_progress,
    )
    write_csv(result.rows, args.out / "layers.csv")
    write_json(
        {
            **record(args),
            "max_spread": MAX_SPREAD,
            "rows": result.rows,
            "comparisons": verdicts,
            "missing": [{"cell": cell.label(), "reason": reason} for cell, reason in result.missing],
        },
        args.out / "layers.json",
    )
    columns = [c for c in LAYER_COLUMNS if c != "peak_mib" or any(d.startswith("cuda") for d in args.devices)]
    labels = [f"{v['layer']} {v['device']} {v['dtype']}" for v in verdicts]
    print(format_comparisons(result.rows, verdicts, columns, labels))
    details = "\n".join(f"  {cell.label()}: {reason}" for cell, reason in result.missing)
    _print_summary(verdicts, result.missing, details, args.time_budget, result.elapsed_s)
    print(f"wrote {args.out / 'layers.csv'} and {args.out / 'layers.json'}")


def run_deploy_benchmark(args: argparse.Namespace) -> None:
    """ONNX Runtime against eager PyTorch: table on stdout, ``deploy.csv``, ``deploy.json`` in ``--out``."""
    rows, facts = run_deploy(
        model_name=args.deploy_model,
        batches=args.batches,
        out=args.out,
        warmup=args.warmup,
        repeats=args.repeats,
        seed=args.seed,
    )
    write_csv(rows, args.out / "deploy.csv")
    write_json(
        {**record(args), "facts": facts, "rows": rows},
        args.out / "deploy.json",
    )
    print(
        f"{args.deploy_model}, input {facts['input']}, {facts['threads']} threads, "
        f"ONNX export {facts['export_s']:.0f} s"
    )
    print(format_table(rows, list(rows[0])))
    print(f"wrote {facts['onnx_file']}, {args.out / 'deploy.csv'} and {args.out / 'deploy.json'}")


def run_compile(args: argparse.Namespace) -> None:
    """Print and write (``compile.json``) the compile time of :mod:`covpool.bench.compile`."""
    report = measure_compile(backend=args.compile_backend, device=args.devices[0])
    print(format_compile(report))
    write_json(
        {**record(args), "report": asdict(report)},
        args.out / "compile.json",
    )
    print(f"wrote {args.out / 'compile.json'}")


def run_host(args: argparse.Namespace) -> None:
    """Print and write (``host.csv``) the eager host times of :mod:`covpool.bench.host`."""
    rows = [row for batch in args.batches for row in host_rows(sizes=tuple(args.sizes), batch=batch)]
    print(f"eager sqrtm on CPU, float32, {torch.get_num_threads()} threads, median of each call:")
    print(format_table(rows, list(rows[0])))
    write_csv(rows, args.out / "host.csv")
    print(f"wrote {args.out / 'host.csv'}")


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv`` and run one part: the matrix-root grid (default), the layer benchmark (``--layers``),
    the CUDA path's counts (``--trace``), the compile (``--compile``) or host (``--host``) overhead, or the
    deployment benchmark (``--deploy``)."""
    args = build_parser().parse_args(argv)
    if args.deploy and (args.layers or args.quick):
        raise SystemExit("--deploy runs alone: drop --layers and --quick")
    if args.deploy:
        args.batches = args.batches or list(DEPLOY_BATCHES)
    if args.host:
        args.sizes = args.sizes or list(HOST_SIZES)
        args.batches = args.batches or [HOST_BATCH]
    args.sizes = args.sizes or list(QUICK_SIZES if args.quick else FULL_SIZES)
    args.batches = args.batches or list(QUICK_BATCHES if args.quick else FULL_BATCHES)
    args.repeats = args.repeats or (QUICK_REPEATS if args.quick else FULL_REPEATS)
    if args.time_budget is None:
        args.time_budget = QUICK_BUDGET_S if args.quick else FULL_BUDGET_S
    if not args.time_budget > 0 or math.isnan(args.time_budget):
        raise SystemExit(f"--time-budget must be > 0 seconds, got {args.time_budget}")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.trace:
        run_trace(args)
    elif args.compile:
        run_compile(args)
    elif args.host:
        run_host(args)
    elif args.deploy:
        run_deploy_benchmark(args)
    else:
        (run_layer_benchmark if args.layers else run_roots)(args)
    print(f"total wall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
