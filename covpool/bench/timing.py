"""Wall-clock time and memory of a forward and of a forward+backward, on any device.

Times are medians over ``repeats`` runs after ``warmup`` runs, by :func:`time.perf_counter` with
:func:`torch.cuda.synchronize` around each run on CUDA. The forward is timed under
:func:`torch.no_grad`; the forward+backward differentiates the output against a fixed random upstream
gradient with :func:`torch.autograd.grad` (no ``.grad`` accumulation).

Memory, two numbers:

- ``saved_bytes`` (every device): bytes of the distinct storages that autograd keeps for the backward,
  recorded with :func:`torch.autograd.graph.saved_tensors_hooks`, not counting the differentiated
  inputs and parameters themselves. This is the memory a method adds to a training step between its
  forward and its backward, and it is exact and noise-free on CPU.
- ``peak_bytes`` (CUDA only, else ``None``): ``torch.cuda.max_memory_allocated`` during one
  forward+backward, minus what was allocated before it (workspaces and temporaries included).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Measurement:
    """Median times in milliseconds and memory in bytes of one benchmark cell."""

    forward_ms: float
    forward_backward_ms: float
    saved_bytes: int
    peak_bytes: int | None

    @property
    def saved_mib(self) -> float:
        """``saved_bytes`` in MiB."""
        return self.saved_bytes / 2**20

    @property
    def peak_mib(self) -> float:
        """``peak_bytes`` in MiB, NaN off CUDA."""
        return math.nan if self.peak_bytes is None else self.peak_bytes / 2**20


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(step: Callable[[], object], *, device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``step()`` in milliseconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        step()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        _synchronize(device)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def saved_tensor_bytes(forward: Callable[[], torch.Tensor], exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages saved for backward by ``forward()``, minus those of ``exclude``."""
    excluded = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    # Holding the storages until the end keeps their addresses from being reused by other tensors.
    storages: dict[int, torch.UntypedStorage] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(storage.nbytes() for storage in storages.values())


def peak_cuda_bytes(step: Callable[[], object], device: torch.device) -> int | None:
    """Peak CUDA memory allocated by ``step()`` above what was allocated before it; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def upstream_gradient(like: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A fixed standard-normal tensor of ``like``'s shape, dtype and device (drawn on CPU, reproducible)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(like.shape, generator=generator, dtype=torch.float64).to(like.device, like.dtype)


def measure(
    forward: Callable[[], torch.Tensor],
    wrt: Sequence[torch.Tensor],
    *,
    device: torch.device,
    warmup: int = 1,
    repeats: int = 5,
) -> Measurement:
    """Time ``forward()`` alone and with the backward to every tensor of ``wrt``; measure its memory.

    ``forward`` takes no argument and must read ``wrt`` (tensors with ``requires_grad=True``: the
    inputs, and a module's parameters) from its closure.

    Example:
        >>> import torch, covpool
        >>> A = covpool.testing.random_spd(2, n=8, dtype=torch.float32).requires_grad_()
        >>> m = measure(lambda: covpool.sqrtm(A, method="eigh"), [A], device=A.device, repeats=2)
        >>> m.forward_ms > 0 and m.saved_bytes > 0
        True
    """
    with torch.no_grad():
        grad = upstream_gradient(forward())

    def forward_only() -> None:
        with torch.no_grad():
            forward()

    def forward_backward() -> None:
        torch.autograd.grad(forward(), wrt, grad)

    return Measurement(
        forward_ms=median_ms(forward_only, device=device, warmup=warmup, repeats=repeats),
        forward_backward_ms=median_ms(forward_backward, device=device, warmup=warmup, repeats=repeats),
        saved_bytes=saved_tensor_bytes(forward, exclude=wrt),
        peak_bytes=peak_cuda_bytes(forward_backward, device),
    )
