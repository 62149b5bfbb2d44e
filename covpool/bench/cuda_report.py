"""The GPU report: sync-free check, roots and layers against ``ns`` and the paper, a captured training step.

``python -m covpool.bench.cuda_report [--out DIR] [--quick]`` on a machine with a CUDA device prints every
figure the docs quote for GPUs (docs/benchmarks.md; and writes them to ``DIR/cuda_report.json``):

1. **Host synchronisations**: default-option forward+backward of the roots and of every layer under
   ``torch.cuda.set_sync_debug_mode("error")``.
2. **Roots**: forward+backward ms of batch 64 at n = 32 … 512 (float32, condition 1e3), eager and captured
   in a CUDA graph, for the default (``mtp``), ``mtp`` fused, ``mtp`` with ``precision="tf32"`` (the mixed
   plan), ``mtp`` at other tolerances, ``mpa``, ``ns`` (5 steps), the paper's configuration and ``eigh``;
   their forward and gradient errors against float64; the achieved matrix-product throughput, and the
   product floor: the time of one product in float32, TF32 and bfloat16 at each size, and of a
   configuration's products alone in the precision each runs in; and the precision each ran in (its plan's
   products, which parts ran in the fused kernels and their ``tl.dot`` precision). Then (2b) the same on
   rank-48 covariances with the heads' ridge, where the default takes the unrolled backward, against
   ``backward="minimax"`` and ``ns``.
3. **Heads on rank-deficient input** (7×7 and 14×14 maps, d = 64 and 256): float32 features and input
   gradients against a float64 ``eigh`` copy.
4. **Layers**: forward+backward ms of each layer with ``mtp``, ``ns``, ``eigh`` and the paper's settings.
5. **A captured training step** of ``resnet18_isqrtcov``: the whole step (forward, loss, backward, SGD)
   in one CUDA graph, against eager: ms per step, the same losses, flat memory over replays.
6. **What the head costs a ResNet-50**: an eager training step (batch 64, 224 px, bfloat16 autocast,
   channels_last, SGD) of timm's ``resnet50`` (average pooling) and of ``resnet50_isqrtcov``, and their
   ratio (issue #18's target: at most 1.12).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import timm
import torch

import covpool
from covpool.bench.trace import trace_root
from covpool.linalg.planner import plan_call, plan_root
from covpool.linalg.precision import products_in, tf32_products
from covpool.numerics import with_relative_ridge
from covpool.testing import (
    random_covariance,
    random_spd,
    reference_gradient,
    reference_root,
    relative_error,
)

ROOT_CONFIGS: dict[str, dict] = {
    "mtp (default)": {},
    "mtp fused": {"method": "mtp", "fused": True},
    "mtp tf32": {"method": "mtp", "precision": "tf32"},
    "mtp tol=1e-2": {"method": "mtp", "tol": 1e-2},
    "mtp tol=1e-5": {"method": "mtp", "tol": 1e-5},
    "mpa": {"method": "mpa"},
    "ns 5 steps": {"method": "ns"},
    "paper": covpool.PAPER_CONFIG,
    "eigh": {"method": "eigh"},
}
GRAPHED = ("mtp (default)", "mtp fused", "mtp tf32", "ns 5 steps", "paper")
RIDGE_CONFIGS: dict[str, dict] = {
    "mtp (default)": {},
    "mtp backward=minimax": {"method": "mtp", "backward": "minimax"},
    "ns 5 steps": {"method": "ns"},
}
"""With the heads' ridge (eps=1e-4): the default takes the unrolled backward in float32."""


def cuda_ms(step: Callable[[], object], *, warmup: int = 3, repeats: int = 20) -> float:
    """Median wall time of ``step`` in ms, by CUDA events around each call."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graphed(step: Callable[[], object]) -> Callable[[], None]:
    """``step`` captured in a CUDA graph (after a warm-up on a side stream); returns the replay.

    The leaves ``step`` differentiates must not have been used in an eager backward on the default
    stream before: autograd remembers the stream of a leaf's first use and would make the default
    (legacy) stream wait on the capture, which CUDA refuses.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def check_syncs() -> dict[str, str]:
    """Default forward+backward of roots and layers under ``set_sync_debug_mode("error")``."""
    cases: dict[str, Callable[[], torch.Tensor]] = {}
    A = random_spd(64, n=64, condition=1e3, dtype=torch.float32, device="cuda").requires_grad_()
    cases["sqrtm"] = lambda: covpool.sqrtm(A)
    cases["inv_sqrtm"] = lambda: covpool.inv_sqrtm(A)
    head = covpool.CovPoolHead(256, 10, reduction_dim=64).cuda()
    x_map = torch.randn(8, 256, 7, 7, device="cuda", requires_grad=True)
    cases["CovPoolHead"] = lambda: head(x_map)
    token_head = covpool.SecondOrderTokenHead(96, 10, reduction_dim=32).cuda()
    tokens = torch.randn(8, 50, 96, device="cuda", requires_grad=True)
    cases["SecondOrderTokenHead"] = lambda: token_head(tokens)
    zca = covpool.ZCABatchNorm2d(64, group_size=16).cuda()
    x_zca = torch.randn(16, 64, 8, 8, device="cuda", requires_grad=True)
    cases["ZCABatchNorm2d (train)"] = lambda: zca(x_zca)
    results = {}
    for name, forward in cases.items():
        forward().sum().backward()  # first call outside: caches, lazy initialisation
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            forward().sum().backward()
            results[name] = "no sync"
        except RuntimeError as error:
            results[name] = f"SYNC: {str(error).splitlines()[0][:120]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return results


def product_ms(n: int, batch: int) -> dict[str, float]:
    """Median ms of one ``(batch, n, n)`` product: float32 at full precision, float32 in TF32 (the scope a
    ``"tf32"`` plan's low phases run in), and bfloat16 operands."""
    a, b = torch.randn(2, batch, n, n, device="cuda")
    times = {}
    with products_in("tf32", torch.float32):  # full precision whatever the user's setting
        times["float32"] = cuda_ms(lambda: torch.bmm(a, b))
        with tf32_products(a.device):
            times["tf32"] = cuda_ms(lambda: torch.bmm(a, b))
    a16, b16 = a.bfloat16(), b.bfloat16()
    times["bf16"] = cuda_ms(lambda: torch.bmm(a16, b16))
    return times


def product_floor(products: float, low: int, times: dict[str, float]) -> float:
    """Time of a call's matrix products alone, ``low`` of them in TF32 and the rest in float32, at the
    measured ``times`` of one product (:func:`product_ms`): the floor a configuration's time is read
    against."""
    return low * times["tf32"] + (products - low) * times["float32"]


def ran_in(options: dict, A: torch.Tensor, eps: float) -> dict:
    """The precision a configuration's call on ``A`` ran in, from its plan: the products' precision
    (``"full"`` or ``"tf32"``), which parts ran in the fused kernels and their ``tl.dot`` precision."""
    from covpool.kernels.fused_iteration import INPUT_PRECISION

    plan = plan_call(covpool.RootOptions.coerce({k: v for k, v in options.items() if k != "eps"}), A, eps)
    fused = [part for part, on in (("forward", plan.fused_forward), ("backward", plan.fused_backward)) if on]
    return {
        "method": plan.method,
        "precision": plan.precision,
        "fused": fused,
        "kernel_products": INPUT_PRECISION if fused else None,
    }


def describe(ran: dict) -> str:
    """:func:`ran_in` in a few words, e.g. ``mtp full, fused forward+backward (tf32x3)``."""
    fused = f", fused {'+'.join(ran['fused'])} ({ran['kernel_products']})" if ran["fused"] else ""
    return f"{ran['method']} {ran['precision']}{fused}"


def bench_roots(
    sizes: list[int],
    batch: int,
    *,
    configs: dict[str, dict] = ROOT_CONFIGS,
    graphed_names: tuple[str, ...] = GRAPHED,
    eps: float = 0.0,
) -> list[dict]:
    """Roots at condition 1e3 (``eps=0``), or on rank-48 covariances with the relative ridge ``eps``."""
    rows = []
    for n in sizes:
        if eps > 0:  # references of the float32-rounded input: rounding alone moves the null space's part
            A64 = random_covariance(batch, n=n, samples=49).float().double().cuda()
        else:
            A64 = random_spd(batch, n=n, condition=1e3, device="cuda")
        upstream64 = torch.randn(batch, n, n, dtype=torch.float64, device="cuda")
        exact = reference_root(with_relative_ridge(A64, eps))
        exact_grad = with_relative_ridge(reference_gradient(with_relative_ridge(A64, eps), upstream64), eps)
        A = A64.float().requires_grad_()
        upstream = upstream64.float()
        times = product_ms(n, batch)
        print(
            f"  n={n:4d} one product: float32 {times['float32'] * 1e3:.1f} µs, "
            f"TF32 {times['tf32'] * 1e3:.1f} µs, bf16 {times['bf16'] * 1e3:.1f} µs"
        )
        for name, options in configs.items():
            options = {**options, "eps": eps}

            def step(options=options, A=A, upstream=upstream) -> None:
                # autograd.grad of a loss: no accumulation into A.grad, the initial gradient made in-graph.
                torch.autograd.grad((covpool.sqrtm(A, **options) * upstream).sum(), A)

            A.grad = None
            try:
                out = covpool.sqrtm(A, **options)
            except ValueError as refusal:  # a plan that cannot certify its tol here (float32, tol=1e-5)
                rows.append({"n": n, "batch": batch, "config": name, "refused": str(refusal)})
                print(f"  n={n:4d} {name:14s} refused: {str(refusal)[:100]}")
                continue
            out.backward(upstream)
            row = {
                "n": n,
                "batch": batch,
                "config": name,
                "forward_error": relative_error(out.detach(), exact).max().item(),
                "gradient_error": relative_error(A.grad, exact_grad).max().item(),
                "eager_ms": cuda_ms(step),
                "ran_in": ran_in(options, A, eps),
            }
            if name in graphed_names:
                A_graph = A.detach().clone().requires_grad_()  # a fresh leaf, see graphed()

                def graph_step(options=options, A_graph=A_graph, upstream=upstream) -> None:
                    torch.autograd.grad((covpool.sqrtm(A_graph, **options) * upstream).sum(), A_graph)

                try:
                    row["graphed_ms"] = cuda_ms(graphed(graph_step))
                except RuntimeError as error:
                    row["graph_error"] = str(error).splitlines()[0][:160]
                    print(f"  n={n} {name}: capture failed: {row['graph_error']}")
            if name.startswith("mtp") or name in ("ns 5 steps", "paper"):
                products = trace_root(lambda a, o=options: covpool.sqrtm(a, **o), n=n, batch=batch).products
                row["products"] = products
                best = row.get("graphed_ms", row["eager_ms"])
                row["tflops"] = products * 2 * n**3 * batch / (best * 1e-3) / 1e12
                plan = plan_root(
                    covpool.RootOptions.coerce({k: v for k, v in options.items() if k != "eps"}),
                    n,
                    eps=eps,
                    device=A.device,
                    dtype=torch.float32,
                )
                low = plan.mixed.products()[0] if plan.mixed is not None else 0
                row["floor_ms"] = product_floor(products, low, times)
            rows.append(row)
            print(
                f"  n={n:4d} {name:14s} eager {row['eager_ms']:8.3f} ms"
                + (f"  graphed {row['graphed_ms']:7.3f} ms" if "graphed_ms" in row else " " * 25)
                + f"  fwd err {row['forward_error']:.1e}  grad err {row['gradient_error']:.1e}"
                + (
                    f"  {row['products']:.0f} products, {row['tflops']:.1f} TFLOP/s, floor "
                    f"{row['floor_ms']:.3f} ms"
                    if "tflops" in row
                    else ""
                )
                + f"  [{describe(row['ran_in'])}]"
            )
    return rows


def head_accuracy() -> list[dict]:
    rows = []
    for d in (64, 256):
        for side in (7, 14):
            torch.manual_seed(0)
            mixing = torch.randn(d, d, dtype=torch.float64) / d**0.5
            x = torch.randn(4, side * side, d, dtype=torch.float64) @ mixing
            x = x.transpose(1, 2).reshape(4, d, side, side).cuda()
            for method in ("mtp", "mpa", "eigh"):
                head = covpool.CovPoolHead(d, 0, reduction_dim=None, root=method).cuda()
                reference = copy.deepcopy(head).double()
                reference.root = covpool.RootOptions(method="eigh")
                x32 = x.float().requires_grad_()
                x64 = x.clone().requires_grad_()
                f32, f64 = head(x32), reference(x64)
                upstream = torch.randn_like(f64)
                (g32,) = torch.autograd.grad(f32, x32, upstream.float())
                (g64,) = torch.autograd.grad(f64, x64, upstream)
                row = {
                    "d": d,
                    "map": f"{side}x{side}",
                    "method": method,
                    "feature_error": relative_error(f32[..., None], f64[..., None]).max().item(),
                    "input_gradient_error": relative_error(
                        g32.flatten(1)[..., None], g64.flatten(1)[..., None]
                    )
                    .max()
                    .item(),
                }
                rows.append(row)
                print(
                    f"  d={d:3d} {side}x{side} {method:5s} features {row['feature_error']:.1e}  "
                    f"input gradients {row['input_gradient_error']:.1e}"
                )
    return rows


LAYERS: dict[str, tuple[Callable[..., torch.nn.Module], tuple[int, ...]]] = {
    "CovPoolHead 32x2048x7x7": (lambda root: covpool.CovPoolHead(2048, 1000, root=root), (32, 2048, 7, 7)),
    "SecondOrderTokenHead 64x197x384": (
        lambda root: covpool.SecondOrderTokenHead(384, 1000, root=root),
        (64, 197, 384),
    ),
    "ZCABatchNorm2d-g16 32x64x32x32": (
        lambda root: covpool.ZCABatchNorm2d(64, group_size=16, root=root),
        (32, 64, 32, 32),
    ),
    "ZCABatchNorm2d-g64 32x64x32x32": (
        lambda root: covpool.ZCABatchNorm2d(64, group_size=64, root=root),
        (32, 64, 32, 32),
    ),
}
LAYER_ROOTS = {"auto (mtp)": None, "ns": "ns", "eigh": "eigh", "paper": covpool.PAPER_CONFIG}


def bench_layers() -> list[dict]:
    rows = []
    for layer_name, (build, shape) in LAYERS.items():
        for root_name, root in LAYER_ROOTS.items():
            torch.manual_seed(0)
            layer = build(root).cuda().train()
            x = torch.randn(shape, device="cuda", requires_grad=True)

            def step(layer=layer, x=x) -> None:
                layer(x).square().mean().backward()

            graph_layer = copy.deepcopy(layer)  # fresh leaves for the capture, see graphed()
            x_graph = x.detach().clone().requires_grad_()
            row = {"layer": layer_name, "root": root_name, "eager_ms": cuda_ms(step, repeats=10)}
            if root_name != "eigh":

                def graph_step(layer=graph_layer, x=x_graph) -> None:
                    layer(x).square().mean().backward()

                try:
                    row["graphed_ms"] = cuda_ms(graphed(graph_step), repeats=10)
                except RuntimeError as error:
                    row["graph_error"] = str(error).splitlines()[0][:160]
            rows.append(row)
            print(
                f"  {layer_name:32s} {root_name:10s} eager {row['eager_ms']:8.3f} ms"
                + (f"  graphed {row['graphed_ms']:7.3f} ms" if "graphed_ms" in row else "")
            )
    return rows


def sgd_step(
    net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, autocast: torch.dtype | None = None
) -> Callable[[], torch.Tensor]:
    """One training step of ``net`` on ``(x, y)``: zeroed gradients (kept allocated, as a CUDA graph
    needs), cross-entropy under ``autocast`` (None: off), backward, an SGD step with momentum. Returns the
    step, which returns the loss. ``x``: ``(batch, 3, h, w)``; ``y``: ``(batch,)`` class indices."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=False)
        with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        return loss

    return step


def head_cost_on_resnet50(batch: int = 64, size: int = 224) -> dict:
    """Eager ms per training step (bfloat16 autocast, channels_last) of timm's ``resnet50`` and
    ``resnet50_isqrtcov``, 1000 classes, and their ratio."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")
    result = {}
    for name in ("resnet50", "resnet50_isqrtcov"):
        net = timm.create_model(name, num_classes=1000).cuda().to(memory_format=torch.channels_last)
        result[f"{name}_ms_per_step"] = cuda_ms(sgd_step(net, x, y, autocast=torch.bfloat16), repeats=10)
        del net
    result["ratio"] = result["resnet50_isqrtcov_ms_per_step"] / result["resnet50_ms_per_step"]
    print(
        f"  resnet50 {result['resnet50_ms_per_step']:.2f} ms/step, resnet50_isqrtcov "
        f"{result['resnet50_isqrtcov_ms_per_step']:.2f} ms/step: {result['ratio']:.2f}x"
    )
    return result


def captured_training_step(steps: int = 20) -> dict:
    """Whole training step of ``resnet18_isqrtcov`` in one CUDA graph against eager, same initial state."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18_isqrtcov", num_classes=10, reduction_dim=64).cuda()
    eager_model = copy.deepcopy(model)
    x = torch.randn(32, 3, 112, 112, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")

    eager_step = sgd_step(eager_model, x, y)
    eager_losses = [eager_step().item() for _ in range(steps)]
    graph_step = sgd_step(model, x, y)
    # Warm-up steps (also creating the momentum buffers) on a side stream, then capture one step.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    warm_losses = []
    with torch.cuda.stream(stream):
        for _ in range(3):
            warm_losses.append(graph_step().item())
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = graph_step()
    graph_losses = list(warm_losses)
    memory = []
    for _ in range(steps - 3):
        graph.replay()
        graph_losses.append(static_loss.item())
        memory.append(torch.cuda.memory_allocated())
    timing_step = sgd_step(copy.deepcopy(eager_model), x, y)
    result = {
        "eager_ms_per_step": cuda_ms(timing_step, repeats=10),
        "graphed_ms_per_step": cuda_ms(graph.replay, repeats=10),
        "max_loss_difference": max(abs(a - b) for a, b in zip(eager_losses, graph_losses, strict=True)),
        "first_loss": eager_losses[0],
        "last_loss": eager_losses[-1],
        "memory_allocated_first_last_mib": [memory[0] / 2**20, memory[-1] / 2**20],
    }
    print(
        f"  eager {result['eager_ms_per_step']:.2f} ms/step, "
        f"graphed {result['graphed_ms_per_step']:.2f} ms/step, "
        f"losses {result['first_loss']:.4f} -> {result['last_loss']:.4f}, max |eager - graphed| "
        f"{result['max_loss_difference']:.1e}, memory {result['memory_allocated_first_last_mib'][0]:.1f} -> "
        f"{result['memory_allocated_first_last_mib'][1]:.1f} MiB over {steps - 3} replays"
    )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_results"), help="folder for cuda_report.json")
    parser.add_argument(
        "--quick", action="store_true", help="n = 64 only, no layers, no ResNet-50 (a smoke run)"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("cuda_report needs a CUDA device")
    # MAGMA's batched Cholesky (mpa, the paper's Padé solve) aborts the process after a graph capture in
    # torch 2.11 (assertion in magma_queue::setup_ptrArray); cuSOLVER does not.
    torch.backends.cuda.preferred_linalg_library("cusolver")
    report: dict = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(),
        "command": "python -m covpool.bench.cuda_report",
    }
    print(f"torch {report['torch']} on {report['device']}")
    print("1. host synchronisations, default options, forward+backward:")
    report["syncs"] = check_syncs()
    for name, verdict in report["syncs"].items():
        print(f"  {name:24s} {verdict}")
    sections = {
        "roots": (
            "2. sqrtm forward+backward, batch 64, float32, condition 1e3:",
            lambda: bench_roots([64] if args.quick else [32, 64, 128, 256, 512], batch=64),
        ),
        "roots_with_ridge": (
            "2b. sqrtm forward+backward, batch 64, float32, rank-48 covariances, the heads' ridge (1e-4):",
            lambda: bench_roots(
                [64] if args.quick else [64, 256],
                batch=64,
                configs=RIDGE_CONFIGS,
                graphed_names=tuple(RIDGE_CONFIGS),
                eps=1e-4,
            ),
        ),
        "heads": (
            "3. CovPoolHead on rank-deficient covariances (eps=1e-4), float32 against a float64 eigh copy:",
            head_accuracy,
        ),
        "layers": ("4. layers, forward+backward (training mode):", bench_layers),
    }
    for key, (title, run) in sections.items():
        if args.quick and key == "layers":
            continue
        print(title)
        try:
            report[key] = run()
        except RuntimeError as error:
            report[key] = {"error": str(error).splitlines()[0][:200]}
            print(f"  failed: {report[key]['error']}")
    print("5. training step of resnet18_isqrtcov (batch 32, 112 px) captured in one CUDA graph:")
    try:
        report["training_step"] = captured_training_step()
    except RuntimeError as error:
        report["training_step"] = {"error": str(error).splitlines()[0][:200]}
        print(f"  capture failed: {report['training_step']['error']}")
    if not args.quick:
        print("6. ResNet-50 training step, batch 64, 224 px, bfloat16 autocast, with and without the head:")
        try:
            report["resnet50_head_cost"] = head_cost_on_resnet50()
        except RuntimeError as error:
            report["resnet50_head_cost"] = {"error": str(error).splitlines()[0][:200]}
            print(f"  failed: {report['resnet50_head_cost']['error']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cuda_report.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out / 'cuda_report.json'}")


if __name__ == "__main__":
    main()
