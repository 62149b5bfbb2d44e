"""How far a float32 eigendecomposition puts the root and its gradient off, in units of ``u κ``.

The study behind :data:`covpool.linalg.eigh.FLOAT32_GROWTH`: ``method="auto"`` on CPU decomposes a
float32 matrix in float32 where ``FLOAT32_GROWTH · u · κ <= tol`` by the matrix's own eigenvalues, so the
constant must bound the measured error of the float32 path (forward and Daleckii-Krein gradient, both
roots) with room. Each case compares the float32 path with the float64 decomposition of the same float32
input, so the input's own rounding is not counted. Inputs: random SPD matrices of a given condition and
ridged sample covariances (rank-deficient before the ridge), the heads' and ZCA's inputs.

Writes ``examples/results/eigh_precision.json`` (``--out``): one row per case and the summary (largest
ratio, the constant, the room between them).

    python examples/studies/eigh_precision.py            # n = 32 ... 256, about a minute on 2 cores
    python examples/studies/eigh_precision.py --sizes 16 --batch 2
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch
from tqdm import tqdm

from covpool.linalg.eigh import FLOAT32_GROWTH, eigh_root
from covpool.testing import random_covariance, random_spd, relative_error

CONDITIONS = (1e1, 1e2, 1e3, 1e4, 1e5)
RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results" / "eigh_precision.json"


def _inputs(family: str, batch: int, n: int, condition: float, generator: torch.Generator) -> torch.Tensor:
    """float32 ``(batch, n, n)`` SPD matrices of about ``condition``."""
    if family == "spd":
        return random_spd(batch, n=n, condition=condition, dtype=torch.float64, generator=generator).float()
    covariance = random_covariance(
        batch, n=n, samples=max(n // 2, 2), dtype=torch.float64, generator=generator
    )
    ridge = covariance.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] / condition
    return (covariance + ridge * torch.eye(n, dtype=torch.float64)).float()


def _root_and_gradient(
    A: torch.Tensor, G: torch.Tensor, inverse: bool, tol: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    X = A.clone().requires_grad_()
    out, _ = eigh_root(X, inverse=inverse, precision="full", tol=tol)
    (grad,) = torch.autograd.grad(out, X, G)
    return out.detach(), grad


def case(family: str, n: int, condition: float, inverse: bool, batch: int, seed: int) -> dict:
    """One row: the float32 path's errors against float64, and as multiples of ``u κ``."""
    generator = torch.Generator().manual_seed(seed)
    A = _inputs(family, batch, n, condition, generator)
    G = torch.randn(A.shape, generator=generator, dtype=torch.float32)
    # tol=inf keeps every matrix on the float32 path; tol=None decomposes every matrix in float64
    single = _root_and_gradient(A, G, inverse, float("inf"))
    double = _root_and_gradient(A, G, inverse, None)
    eigenvalues = torch.linalg.eigvalsh(A.double())
    kappa = eigenvalues[..., -1] / eigenvalues[..., 0]
    unit = torch.finfo(torch.float32).eps * kappa
    forward = relative_error(single[0], double[0])
    gradient = relative_error(single[1], double[1])
    return {
        "family": family,
        "n": n,
        "condition": condition,
        "inverse": inverse,
        "kappa_max": float(kappa.max()),
        "forward_error": float(forward.max()),
        "gradient_error": float(gradient.max()),
        "forward_ratio": float((forward / unit).max()),
        "gradient_ratio": float((gradient / unit).max()),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256], metavar="N")
    parser.add_argument("--batch", type=int, default=8, help="matrices per case (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help=f"results file (default {RESULTS})")
    args = parser.parse_args(argv)
    grid = [
        (family, n, condition, inverse)
        for family in ("spd", "ridged-covariance")
        for n in args.sizes
        for condition in CONDITIONS
        for inverse in (False, True)
    ]
    rows = [case(*point, batch=args.batch, seed=args.seed) for point in tqdm(grid, desc="cases")]
    worst = max(max(row["forward_ratio"], row["gradient_ratio"]) for row in rows)
    summary = {"largest_ratio": worst, "FLOAT32_GROWTH": FLOAT32_GROWTH, "room": FLOAT32_GROWTH / worst}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    print(f"largest error of the float32 path: {worst:.3g} u κ; FLOAT32_GROWTH = {FLOAT32_GROWTH:g}")
    print(f"room: {summary['room']:.2f}x")
    print(f"wrote {args.out}")
    return summary


if __name__ == "__main__":
    main()
