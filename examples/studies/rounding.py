"""How rounding limits each backward in float32, on the covariances covariance heads produce.

``python examples/studies/rounding.py`` prints, for ridged sample covariances (``samples`` positions, 49 as
in a 7 × 7 map or ``n / 4``; ``n`` channels; relative ridge ``eps``), the relative error of the float32
gradient of :func:`covpool.sqrtm` against float64 Daleckii-Krein on the float32-rounded input, for the
Lyapunov backward (``backward="minimax"``), the unrolled backward and float32 ``eigh``, with the model
:func:`covpool.linalg.lyapunov.rounding_error` that chooses between the first two. Two measures:

- ``range``: the gradient applied to the range of the covariance, all that reaches the features of a head
  (``(G + Gᵀ) X / N`` with the columns of ``X`` in that range);
- ``full``: the whole matrix, dominated by its null-space block, whose entries follow the ridge's
  eigenvalues and so already move by about 1e-3 when ``A`` is rounded to float32 (eigh shows it).

The table backs :data:`covpool.linalg.lyapunov.ROUNDING_GROWTH`: the largest ``lyapunov / (u κ)`` it shows
where rounding dominates (``κ >= 1e5``; below, the schedule's own error, up to ``tol``, does). It also shows
where the unrolled backward is the worse one: full-rank input (``samples > n``) whose own condition
number is large.

Its other tables (``--tables``): ``heads``, float32 :class:`covpool.CovPoolHead` against its float64 copy;
``input``, how far rounding a sample covariance puts ``λmin(A / tr A)`` below the ridge's bound (what
:data:`covpool.linalg.certify.TRACE_ROUNDING` covers); ``trace``, the products and kernels of each
backward on the CUDA path (fake tensors, torch >= 2.11). Writes ``rounding.csv`` (the backward table) and
``rounding.json`` (every table) under ``--out`` (``examples/results/``, the recorded results).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from study import make_parser, mtp_plan, parse, write_rows
from tqdm.auto import tqdm

import covpool
from covpool.bench.report import format_table
from covpool.bench.timing import saved_tensor_bytes
from covpool.bench.trace import FAKE_CUDA_SUPPORTED, trace_root
from covpool.linalg.certify import TRACE_ROUNDING
from covpool.linalg.lyapunov import rounding_error
from covpool.linalg.normalization import normalise
from covpool.numerics import with_relative_ridge
from covpool.testing import random_covariance, reference_gradient, relative_error

ROUNDING_SIZES = (32, 64, 128, 256)
ROUNDING_EPS = (1e-2, 1e-3, 1e-4, 1e-5)
SAMPLES = 49  # a 7 × 7 feature map
ROUNDING_DOMINATES = 1e5
"""κ bound from which the Lyapunov gradient's float32 error is mostly rounding (at ``tol=1e-3``)."""


def rounding_row(n: int, samples: int, eps: float, *, batch: int = 4, seed: int = 0) -> dict:
    """One row of the table: errors of each backward for ``batch`` covariances of size ``n``."""
    generator = torch.Generator().manual_seed(seed)
    A = random_covariance(batch, n=n, samples=samples, generator=generator).float()
    upstream = torch.randn(A.shape, generator=generator, dtype=torch.float64).float()
    exact = with_relative_ridge(
        reference_gradient(with_relative_ridge(A.double(), eps), upstream.double()), eps
    )
    rank = min(samples - 1, n)
    basis = torch.linalg.eigh(A.double())[1][..., -rank:]
    plan = mtp_plan(n, eps=eps)
    kappa = 1.0 / plan.lower**2
    row = {"n": n, "samples": samples, "eps": eps, "kappa_bound": kappa, "default": plan.gradient}
    for label, options in (
        ("lyapunov", {"method": "mtp", "backward": "minimax"}),
        ("unrolled", {"method": "mtp", "backward": "unrolled"}),
        ("eigh", {"method": "eigh"}),
    ):
        leaf = A.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(covpool.sqrtm(leaf, options, eps=eps), leaf, upstream)
        grad = grad.double()
        row[f"{label}_range"] = relative_error(grad @ basis, exact @ basis).max().item()
        row[f"{label}_full"] = relative_error(grad, exact).max().item()
        if label != "eigh":  # kept for the backward, in n × n float32 matrices per input matrix
            saved = saved_tensor_bytes(lambda o=options, a=leaf: covpool.sqrtm(a, o, eps=eps), exclude=[leaf])
            row[f"{label}_saved"] = saved / (4 * A.numel())
    unit = torch.finfo(torch.float32).eps
    row["model"] = rounding_error(plan.lower, unit)
    row["lyapunov_growth"] = max(row["lyapunov_range"], row["lyapunov_full"]) / (unit * kappa)
    return row


HEAD_CASES = ((64, 7), (64, 14), (256, 7), (256, 14))
HEAD_ROOTS = (
    ("mtp", "mtp"),
    ("mtp, backward=minimax", {"method": "mtp", "backward": "minimax"}),
    ("mpa", "mpa"),
    ("eigh", "eigh"),
)


def head_rows(*, batch: int = 4, seed: int = 0) -> list[dict]:
    """Float32 :class:`covpool.CovPoolHead` (no reduction, default ridge) against its float64 ``eigh`` copy.

    Input: correlated feature maps ``(batch, d, side, side)`` with ``side² < d`` except at ``d = 64,
    14 × 14``; errors are the largest relative error over the batch of the pooled features and of the
    input gradients for one random upstream gradient.
    """
    rows = []
    for channels, side in HEAD_CASES:
        generator = torch.Generator().manual_seed(seed)
        mixing = torch.randn(channels, channels, generator=generator, dtype=torch.float64) / channels**0.5
        x = torch.randn(batch, side * side, channels, generator=generator, dtype=torch.float64) @ mixing
        x = x.transpose(1, 2).reshape(batch, channels, side, side)
        upstream = None
        for label, root in HEAD_ROOTS:
            head = covpool.CovPoolHead(channels, 0, reduction_dim=None, root=root)
            reference = copy.deepcopy(head).double()
            reference.root = covpool.RootOptions(method="eigh")
            x32, x64 = x.float().requires_grad_(True), x.clone().requires_grad_(True)
            out32, out64 = head(x32), reference(x64)
            if upstream is None:
                upstream = torch.randn(out64.shape, generator=generator, dtype=torch.float64)
            (g32,) = torch.autograd.grad(out32, x32, upstream.float())
            (g64,) = torch.autograd.grad(out64, x64, upstream)
            rows.append(
                {
                    "d": channels,
                    "map": f"{side}x{side}",
                    "root": label,
                    "features": relative_error(out32.detach().double()[:, None], out64.detach()[:, None])
                    .max()
                    .item(),
                    "input_gradient": relative_error(
                        g32.double().flatten(1)[:, None], g64.flatten(1)[:, None]
                    )
                    .max()
                    .item(),
                }
            )
    return rows


INPUT_SIZES = (16, 32, 64, 128, 256, 512)


def input_rounding_rows(*, eps: float = 1e-4, batch: int = 16, seed: int = 0) -> list[dict]:
    """How far rounding puts ``λmin(A / tr A)`` below the ridge's bound ``eps / (n (1 + eps))``, in machine
    epsilons, for float32 sample covariances computed as a head computes them (``X Xᵀ / N`` of centred
    features, 8 or 49 positions, flat or decaying channel scales): what
    :data:`covpool.linalg.certify.TRACE_ROUNDING` must cover.
    """
    generator = torch.Generator().manual_seed(seed)
    unit = torch.finfo(torch.float32).eps
    rows = []
    for n in INPUT_SIZES:
        for samples in (8, SAMPLES):
            for profile in ("flat", "decaying"):
                X = torch.randn(batch, n, samples, generator=generator)
                if profile == "decaying":
                    X = X * torch.logspace(0, -2, n)[:, None]
                X = X - X.mean(-1, keepdim=True)
                A_hat, _ = normalise(with_relative_ridge(X @ X.mT / samples, eps), "trace")
                smallest = torch.linalg.eigvalsh(A_hat.double()).min().item()
                bound = eps / (n * (1 + eps))
                rows.append(
                    {
                        "n": n,
                        "samples": samples,
                        "profile": profile,
                        "below_bound_in_u": (bound - smallest) / unit,
                    }
                )
    return rows


TRACE_BACKWARDS = (("lyapunov", "minimax"), ("unrolled", "unrolled"))


def trace_rows(sizes: tuple[int, ...], *, eps: float = 1e-4, batch: int = 64) -> list[dict]:
    """Products and kernels of ``sqrtm`` with the heads' ridge on the CUDA path, per backward (fake tensors).

    Needs torch >= 2.11 (:data:`covpool.bench.trace.FAKE_CUDA_SUPPORTED`).
    """
    rows = []
    for n in sizes:
        for label, backward in TRACE_BACKWARDS:
            options = covpool.RootOptions(method="mtp", backward=backward)
            result = trace_root(lambda a, o=options: covpool.sqrtm(a, o, eps=eps), n=n, batch=batch)
            kernels = result.forward.kernels + result.backward.kernels
            rows.append(
                {
                    "n": n,
                    "backward": label,
                    "syncs": result.syncs,
                    "products": result.products,
                    "kernels": kernels,
                    "kernels_per_product": result.kernels_per_product,
                }
            )
    return rows


TABLES = ("backward", "heads", "input", "trace")


def main(argv: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """Run the study (``--help``), print its tables, write its results; returns the tables."""
    parser = make_parser(__doc__, sizes=ROUNDING_SIZES)
    parser.add_argument(
        "--tables", nargs="+", choices=TABLES, default=list(TABLES), help="tables to make (default all)"
    )
    parser.add_argument(
        "--input-batch", type=int, default=16, metavar="B", help="covariances per case of the input table"
    )
    args = parse(parser, argv)
    tables: dict[str, list[dict]] = dict.fromkeys(TABLES, [])
    if "backward" in args.tables:
        cases = [(n, s, eps) for n in args.sizes for s in (SAMPLES, max(n // 4, 8)) for eps in ROUNDING_EPS]
        bar = tqdm(cases, desc="rounding", unit="case", disable=args.no_progress)
        rows = tables["backward"] = [rounding_row(n, samples, eps, seed=args.seed) for n, samples, eps in bar]
        print(format_table(rows, list(rows[0])))
        dominated = [r["lyapunov_growth"] for r in rows if r["kappa_bound"] >= ROUNDING_DOMINATES]
        if dominated:
            print(f"largest lyapunov / (u kappa) where kappa >= {ROUNDING_DOMINATES:g}: {max(dominated):.3g}")
    if "heads" in args.tables:
        heads = tables["heads"] = head_rows(seed=args.seed)
        print("\nCovPoolHead, float32 against its float64 eigh copy (default ridge eps=1e-4):")
        print(format_table(heads, list(heads[0])))
    if "input" in args.tables:
        inputs = tables["input"] = input_rounding_rows(batch=args.input_batch, seed=args.seed)
        print("\nfloat32 sample covariances, eps=1e-4: how far λmin(A / tr A) falls below the ridge's bound:")
        print(format_table(inputs, list(inputs[0])))
        largest = max(r["below_bound_in_u"] for r in inputs)
        print(f"largest: {largest:.3g} u (the trace's bound leaves {TRACE_ROUNDING:g} u)")
    if "trace" in args.tables and not FAKE_CUDA_SUPPORTED:
        print(f"\n(no traced counts: fake CUDA tensors need torch >= 2.11, this is {torch.__version__})")
    elif "trace" in args.tables:
        traced = tables["trace"] = trace_rows(tuple(args.sizes))
        print("\nsqrtm with the heads' ridge (eps=1e-4), batch 64, forward+backward, traced CUDA path:")
        print(format_table(traced, list(traced[0])))
    write_rows(
        args,
        "rounding",
        tables["backward"],
        heads=tables["heads"],
        input_rounding=tables["input"],
        trace=tables["trace"],
    )
    return tables


if __name__ == "__main__":
    main()
