"""Compile time of a small model with a covariance head: ``python -m covpool.bench --compile``.

The model is a ``3×3`` convolution, ReLU and :class:`covpool.CovPoolHead` with its defaults (``root="auto"``,
which is mtp while tracing, and the ridge ``eps=1e-4``, which takes mtp's fused unrolled backward) on
``16 × 16`` inputs. It is compiled by ``torch.compile`` (inductor unless ``backend`` says otherwise) with
inductor's caches off, so that every run pays what the first run on a machine pays, and run forward and
backward.

What is reported (:class:`CompileReport`): the wall time of the first forward and of the first backward
(both compile), dynamo's share (tracing the Python bytecode into graphs, the roots' planning included) and
the backend's (AOT autograd, lowering, code generation and the C++ compiler), the frames dynamo compiled,
the graphs and graph breaks, and the time of a compiled step once warm against an eager one.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
import torch._dynamo
import torch._inductor.config
from torch import nn

from covpool.bench.timing import median_ms
from covpool.layers import CovPoolHead

COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
"""Backends of ``--compile-backend``: inductor (the default of ``torch.compile``), AOT autograd alone, dynamo
alone."""
COMPILE_INPUT = (8, 3, 16, 16)
"""Batch, channels, height and width of the model's input."""
COMPILE_CHANNELS = 16
COMPILE_REDUCTION = 32
"""Channels of the convolution and ``d`` of the head (the root is of ``32 × 32`` matrices)."""


@dataclass(frozen=True)
class CompileReport:
    """What compiling the model cost (seconds unless named otherwise).

    Attributes:
        backend: ``torch.compile``'s backend.
        first_forward_s: wall time of the first compiled forward (dynamo and the forward graph's compile).
        first_backward_s: wall time of the first backward (the backward graph's compile).
        dynamo_s: time dynamo spent tracing bytecode, outside the backend.
        backend_s: time in the backend, forward and backward graphs.
        frames: frames dynamo compiled (one per graph break or recompilation, plus one).
        graphs: graphs handed to the backend.
        graph_breaks: graph breaks, with their reasons in ``break_reasons``.
        break_reasons: reason of each graph break (its first line).
        compiled_step_ms: median forward+backward time once compiled (after 3 untimed steps).
        eager_step_ms: median forward+backward time of the same model uncompiled (after 3 untimed steps).
    """

    backend: str
    first_forward_s: float
    first_backward_s: float
    dynamo_s: float
    backend_s: float
    frames: int
    graphs: int
    graph_breaks: int
    break_reasons: tuple[str, ...]
    compiled_step_ms: float
    eager_step_ms: float


def compile_model(*, device: str = "cpu") -> nn.Module:
    """The benchmark's model: conv, ReLU and a default :class:`covpool.CovPoolHead` with 10 classes."""
    return nn.Sequential(
        nn.Conv2d(COMPILE_INPUT[1], COMPILE_CHANNELS, 3, padding=1, device=device),
        nn.ReLU(),
        CovPoolHead(COMPILE_CHANNELS, 10, reduction_dim=COMPILE_REDUCTION, device=device),
    )


def _step(model: nn.Module, x: torch.Tensor) -> None:
    model(x).sum().backward()


def _median_ms(model: nn.Module, x: torch.Tensor, repeats: int, device: str) -> float:
    """Median forward+backward time after 3 untimed steps (the first eager ``eigh`` calls on CPU have
    taken 0.3 s each, later ones a few ms)."""
    return median_ms(lambda: _step(model, x), device=torch.device(device), warmup=3, repeats=repeats)


def _metric(name: str) -> float:
    """Total seconds dynamo's timers recorded under ``name`` (0 where none ran)."""
    return sum(torch._dynamo.utils.compilation_time_metrics.get(name, []))


def measure_compile(*, backend: str = "inductor", device: str = "cpu", repeats: int = 10) -> CompileReport:
    """Compile :func:`compile_model` afresh (dynamo reset, inductor's caches off) and time it."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch._dynamo.utils.compilation_time_metrics.clear()
    torch.manual_seed(0)
    model = compile_model(device=device)
    x = torch.randn(COMPILE_INPUT, device=device)
    eager_step_ms = _median_ms(model, x, repeats, device)  # before inductor's compile workers start
    compiled = torch.compile(model, backend=backend)
    with torch._inductor.config.patch(force_disable_caches=True), warnings.catch_warnings():
        # dynamo says, once, that the caches being off turn its profile-guided cache off too
        warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
        start = time.perf_counter()
        out = compiled(x)
        first_forward = time.perf_counter() - start
        start = time.perf_counter()
        out.sum().backward()
        first_backward = time.perf_counter() - start
    counters = torch._dynamo.utils.counters
    backend_s = _metric("OutputGraph.call_user_compiler") + _metric("backward._backward_impl")
    reasons = tuple(
        reason.strip().splitlines()[0]
        for reason, count in counters["graph_break"].items()
        for _ in range(count)
    )
    report = CompileReport(
        backend=backend,
        first_forward_s=first_forward,
        first_backward_s=first_backward,
        dynamo_s=_metric("_compile.compile_inner") - _metric("OutputGraph.call_user_compiler"),
        backend_s=backend_s,
        frames=counters["frames"]["ok"],
        graphs=counters["stats"]["unique_graphs"],
        graph_breaks=len(reasons),
        break_reasons=reasons,
        compiled_step_ms=_median_ms(compiled, x, repeats, device),
        eager_step_ms=eager_step_ms,
    )
    torch._dynamo.reset()
    return report


def format_compile(report: CompileReport) -> str:
    """The report as printed lines."""
    lines = [
        f"torch.compile(backend={report.backend!r}) of conv + CovPoolHead(d={COMPILE_REDUCTION}), "
        f"input {COMPILE_INPUT}, torch {torch.__version__}, {torch.get_num_threads()} threads, caches off",
        f"first forward {report.first_forward_s:.1f} s, first backward {report.first_backward_s:.1f} s "
        f"(dynamo {report.dynamo_s:.1f} s, backend {report.backend_s:.1f} s)",
        f"frames {report.frames}, graphs {report.graphs}, graph breaks {report.graph_breaks}",
        *(f"  break: {reason}" for reason in report.break_reasons),
        f"step once compiled {report.compiled_step_ms:.2f} ms, eager {report.eager_step_ms:.2f} ms (median)",
    ]
    return "\n".join(lines)
