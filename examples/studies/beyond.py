"""Inputs beyond the assumed bound: is any result silently wrong? (``python examples/studies/beyond.py``)

The roots' schedules are certified for a spectrum inside the interval that ``eps`` or ``condition``
promise. A user who ridges a covariance themselves (``eps=0``, so ``condition=1e3`` is assumed) or passes
a full-rank SPD matrix of larger condition breaks the promise; the residual test must then flag the
matrix (NaN, counted, or a ``ValueError`` with host checks) or the plan must refuse the call. This grid
classifies every case against float64 eigendecomposition references of the input as passed (a float32
input's own rounding moves its inverse root by up to 3e-3 at κ = 1e6: no root can undo it):

- ``within``: forward and gradient relative errors at most ``2 tol`` (the first-order factor);
- ``flagged``: every matrix the root got wrong came back NaN (none was wrong: that is ``within``);
- ``refused``: the call raised ``ValueError`` (host checks, or a plan that cannot certify ``tol``);
- ``silently wrong``: a finite result beyond ``2 tol``. The target is none.

Methods: ``mtp``, ``mpa``, ``auto`` and ``tf32``, mtp's mixed-precision plan (``precision="tf32"``; its
TF32 products emulated off CUDA; float64 input is refused).

Prints the count of each verdict per method and dtype and every silently wrong case; writes
``beyond.csv`` and ``beyond.json`` (every case) under ``--out`` (``examples/results/``, the recorded
results).
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from study import make_parser, parse, write_rows
from tqdm.auto import tqdm

import covpool
from covpool.linalg.options import DEFAULT_TOL
from covpool.testing import (
    random_spd,
    reference_gradient,
    reference_root,
    relative_error,
    user_ridged_covariance,
)

CONDITIONS = (1e3, 1e4, 1e5, 1e6)
KINDS = ("ridged", "spd")
SIZES = (32, 64, 128)
METHODS = ("mtp", "mpa", "auto", "tf32")
DTYPES = ("float32", "float64")
FUNCTIONS = ("sqrtm", "inv_sqrtm")
BATCH = 3
VERDICTS = ("within", "flagged", "refused", "silently wrong")


@dataclass(frozen=True)
class Case:
    """One cell of the grid: ``BATCH`` matrices of one kind and condition through one root."""

    kind: str
    condition: float
    n: int
    dtype: str
    method: str
    function: str

    def inputs(self, generator: torch.Generator) -> torch.Tensor:
        """The float64 matrices of this case. Shape: ``(BATCH, n, n)``."""
        if self.kind == "ridged":
            return user_ridged_covariance(BATCH, self.n, self.condition, generator)
        return random_spd(BATCH, n=self.n, condition=self.condition, generator=generator)


def cases(
    *,
    kinds: tuple[str, ...] = KINDS,
    conditions: tuple[float, ...] = CONDITIONS,
    sizes: tuple[int, ...] = SIZES,
    methods: tuple[str, ...] = METHODS,
    dtypes: tuple[str, ...] = DTYPES,
) -> Iterator[Case]:
    """Every combination of kind, condition, size, dtype, method and function."""
    for kind, condition, n, dtype, method, function in itertools.product(
        kinds, conditions, sizes, dtypes, methods, FUNCTIONS
    ):
        yield Case(kind, condition, n, dtype, method, function)


def classify(case: Case, *, device: str = "cpu", seed: int = 0) -> dict:
    """Run one case with default options (no host checks, so the sync-free path decides) and say what
    became of it: a row with the verdict, the worst errors of the finite results and the flagged count."""
    generator = torch.Generator().manual_seed(seed)
    A = case.inputs(generator)
    upstream = torch.randn(A.shape, dtype=torch.float64, generator=generator)
    inverse = case.function == "inv_sqrtm"
    row = {
        "kind": case.kind,
        "condition": case.condition,
        "n": case.n,
        "dtype": case.dtype,
        "method": case.method,
        "function": case.function,
    }
    X = A.to(device=device, dtype=getattr(torch, case.dtype)).requires_grad_(True)
    try:
        options = dict(method="mtp", precision="tf32") if case.method == "tf32" else dict(method=case.method)
        out = getattr(covpool, case.function)(X, **options, check_input=False)
        out.backward(upstream.to(X))
    except ValueError as error:
        return {
            **row,
            "verdict": "refused",
            "flagged": 0,
            "forward": None,
            "gradient": None,
            "why": str(error),
        }
    flagged = torch.isnan(out.detach()).flatten(-2).all(-1).cpu()
    given = X.detach().cpu().double()  # the root of the input as passed: float32's rounding of A included
    forward = relative_error(out.detach().cpu(), reference_root(given, inverse=inverse))
    gradient = relative_error(X.grad.cpu(), reference_gradient(given, upstream, inverse=inverse))
    wrong = ~flagged & ((forward > 2 * DEFAULT_TOL) | (gradient > 2 * DEFAULT_TOL))
    finite = ~flagged
    verdict = "silently wrong" if wrong.any() else "flagged" if flagged.any() else "within"
    return {
        **row,
        "verdict": verdict,
        "flagged": int(flagged.sum()),
        "forward": float(forward[finite].max()) if finite.any() else None,
        "gradient": float(gradient.detach()[finite].max()) if finite.any() else None,
        "why": "",
    }


def run_beyond(
    *,
    device: str = "cpu",
    kinds: tuple[str, ...] = KINDS,
    conditions: tuple[float, ...] = CONDITIONS,
    sizes: tuple[int, ...] = SIZES,
    methods: tuple[str, ...] = METHODS,
    dtypes: tuple[str, ...] = DTYPES,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """:func:`classify` every case of the grid, with a progress bar."""
    grid = list(cases(kinds=kinds, conditions=conditions, sizes=sizes, methods=methods, dtypes=dtypes))
    return [
        classify(case, device=device, seed=seed)
        for case in tqdm(grid, desc="beyond the bound", disable=not progress, unit="case")
    ]


def summary(rows: list[dict]) -> str:
    """Counts of each verdict per method and dtype, the total, and every silently wrong case."""
    lines = [f"{'method':<6} {'dtype':<8} " + " ".join(f"{v:>14}" for v in VERDICTS)]
    for method, dtype in sorted({(r["method"], r["dtype"]) for r in rows}):
        chosen = [r for r in rows if r["method"] == method and r["dtype"] == dtype]
        counts = [sum(r["verdict"] == v for r in chosen) for v in VERDICTS]
        lines.append(f"{method:<6} {dtype:<8} " + " ".join(f"{c:>14}" for c in counts))
    totals = [sum(r["verdict"] == v for r in rows) for v in VERDICTS]
    lines.append(f"{'all':<15} " + " ".join(f"{c:>14}" for c in totals) + f"   ({len(rows)} cases)")
    for r in rows:
        if r["verdict"] == "silently wrong":
            lines.append(
                f"SILENTLY WRONG: {r['function']} {r['method']} {r['dtype']} {r['kind']} "
                f"κ={r['condition']:g} n={r['n']}: forward {r['forward']:.2g}, gradient {r['gradient']:.2g}"
            )
    return "\n".join(lines)


def _device(text: str) -> str:
    if torch.device(text).type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"--device {text!r} given but torch.cuda.is_available() is False")
    return text


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the study (``--help``), print its counts, write every case; returns the rows."""
    parser = make_parser(__doc__, sizes=SIZES)
    parser.add_argument("--device", type=_device, default="cpu", help="where the roots run (default cpu)")
    for flag, values, kind in (
        ("--dtype", DTYPES, str),
        ("--methods", METHODS, str),
        ("--kinds", KINDS, str),
        ("--conditions", CONDITIONS, float),
    ):
        choices = None if kind is float else values
        parser.add_argument(
            flag,
            nargs="+",
            type=kind,
            choices=choices,
            default=list(values),
            metavar=flag[2:].upper().rstrip("S"),
            help="default " + " ".join(f"{value:g}" if kind is float else value for value in values),
        )
    args = parse(parser, argv)
    rows = run_beyond(
        device=args.device,
        kinds=tuple(args.kinds),
        conditions=tuple(args.conditions),
        sizes=tuple(args.sizes),
        methods=tuple(args.methods),
        dtypes=tuple(args.dtype),
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(summary(rows))
    write_rows(args, "beyond", rows)
    return rows


if __name__ == "__main__":
    main()
