"""Wall-clock time and memory of a forward and of a forward+backward, on any device.

Times are in milliseconds, by :func:`time.perf_counter` with :func:`torch.cuda.synchronize` around each
run on CUDA. The forward is timed under :func:`torch.no_grad`; the forward+backward differentiates the
output against a fixed random upstream gradient with :func:`torch.autograd.grad` (no ``.grad``
accumulation).

Interleaving: the configurations compared with each other are timed round-robin
(:func:`time_interleaved`): each of ``repeats`` rounds runs every configuration's forward and
forward+backward once, starting one step later in the order each round, so a burst of load from another
process hits all of them alike instead of whichever happened to run during it. Each cell keeps the
fastest, median and slowest of its runs (:class:`Spread`); how wide a spread may be before a comparison
is not ranked is :mod:`covpool.bench.ranking`'s rule.

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
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

Key = TypeVar("Key", bound=Hashable)
Timer = Callable[[], float]
"""A clock in seconds, :func:`time.perf_counter` unless a test injects another."""


@dataclass(frozen=True)
class Spread:
    """Fastest, median and slowest of the timed runs of one cell, in milliseconds (NaN: not timed)."""

    min: float
    median: float
    max: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Spread:
        """The spread of ``samples``; all NaN when there are none.

        Example:
            >>> Spread.of([3.0, 1.0, 2.0, 10.0]).ratio
            10.0
        """
        if not samples:
            return cls(math.nan, math.nan, math.nan)
        return cls(min(samples), statistics.median(samples), max(samples))

    @property
    def ratio(self) -> float:
        """``max / min``: 1 when every run took the same time; NaN when not timed."""
        if math.isnan(self.min):
            return math.nan
        return self.max / self.min if self.min > 0 else math.inf


@dataclass(frozen=True)
class Measurement:
    """Time spreads in milliseconds and memory in bytes of one benchmark cell."""

    forward: Spread
    forward_backward: Spread
    saved_bytes: int
    peak_bytes: int | None

    @property
    def forward_ms(self) -> float:
        """Median forward time."""
        return self.forward.median

    @property
    def forward_backward_ms(self) -> float:
        """Median forward+backward time."""
        return self.forward_backward.median

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


def error_message(error: BaseException) -> str:
    """First line of ``error``'s message (at most 120 characters), else its type's name."""
    lines = str(error).strip().splitlines()
    return lines[0][:120] if lines else type(error).__name__


def time_interleaved(
    steps: Mapping[Key, Callable[[], object]],
    *,
    device: torch.device,
    warmup: int = 1,
    repeats: int = 5,
    timer: Timer = time.perf_counter,
) -> tuple[dict[Key, list[float]], dict[Key, str]]:
    """``(times, failures)``: ``repeats`` wall times in ms of every step, the steps timed round-robin.

    After ``warmup`` untimed rounds, round ``r`` runs every step once, in the order of ``steps`` rotated
    by ``r``. A step that raises ``RuntimeError`` (out of memory, a failed decomposition, a dtype a kernel
    lacks) leaves the rotation; ``failures`` maps it to the first line of the message, and ``times``
    keeps what it measured before.

    Example:
        >>> ticks = iter(range(100))
        >>> times, failures = time_interleaved({"a": lambda: None, "b": lambda: None},
        ...                                    device=torch.device("cpu"), warmup=0, repeats=2,
        ...                                    timer=lambda: next(ticks) / 1e3)
        >>> times, failures
        ({'a': [1.0, 1.0], 'b': [1.0, 1.0]}, {})
    """
    keys = list(steps)
    times: dict[Key, list[float]] = {key: [] for key in keys}
    failures: dict[Key, str] = {}

    def run(key: Key) -> float:
        start = timer()
        try:
            steps[key]()
            _synchronize(device)
        except RuntimeError as error:
            failures[key] = error_message(error)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return 1e3 * (timer() - start)

    for _ in range(warmup):
        for key in keys:
            if key not in failures:
                run(key)
    for index in range(repeats):
        shift = index % len(keys) if keys else 0
        for key in keys[shift:] + keys[:shift]:
            if key not in failures:
                elapsed = run(key)
                if key not in failures:
                    times[key].append(elapsed)
    return times, failures


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


Case = tuple[Callable[[], torch.Tensor], Sequence[torch.Tensor]]
"""``(forward, wrt)``: a forward taking no argument, and the tensors it is differentiated against."""


def measure_interleaved(
    cases: Mapping[Key, Case],
    *,
    device: torch.device,
    warmup: int = 1,
    repeats: int = 5,
    timer: Timer = time.perf_counter,
) -> tuple[dict[Key, Measurement], dict[Key, str]]:
    """``(measurements, failures)`` of cases compared with each other, their repeats interleaved.

    Each case is ``(forward, wrt)``: ``forward()`` takes no argument and reads ``wrt`` (tensors with
    ``requires_grad=True``: the inputs, and a module's parameters) from its closure. Its forward alone
    and its forward+backward to every tensor of ``wrt`` are two steps of one :func:`time_interleaved`
    rotation with every other case's. A case whose forward or backward raises ``RuntimeError`` is in
    ``failures`` (first line of the message) and not in ``measurements``.
    """
    steps: dict[tuple[Key, bool], Callable[[], object]] = {}
    failures: dict[Key, str] = {}
    for key, (forward, wrt) in cases.items():
        try:
            with torch.no_grad():
                grad = upstream_gradient(forward())
        except RuntimeError as error:
            failures[key] = error_message(error)
            continue

        def forward_only(forward=forward) -> None:
            with torch.no_grad():
                forward()

        def forward_backward(forward=forward, wrt=wrt, grad=grad) -> None:
            torch.autograd.grad(forward(), wrt, grad)

        steps[key, False] = forward_only
        steps[key, True] = forward_backward
    times, failed_steps = time_interleaved(steps, device=device, warmup=warmup, repeats=repeats, timer=timer)
    for (key, _), message in failed_steps.items():
        failures.setdefault(key, message)
    measurements = {}
    for key, (forward, wrt) in cases.items():
        if key in failures:
            continue
        try:
            measurements[key] = Measurement(
                forward=Spread.of(times[key, False]),
                forward_backward=Spread.of(times[key, True]),
                saved_bytes=saved_tensor_bytes(forward, exclude=wrt),
                peak_bytes=peak_cuda_bytes(steps[key, True], device),
            )
        except RuntimeError as error:
            failures[key] = error_message(error)
    return measurements, failures


def measure(
    forward: Callable[[], torch.Tensor],
    wrt: Sequence[torch.Tensor],
    *,
    device: torch.device,
    warmup: int = 1,
    repeats: int = 5,
) -> Measurement:
    """Time ``forward()`` alone and with the backward to every tensor of ``wrt``; measure its memory.

    One case of :func:`measure_interleaved`; its ``RuntimeError`` propagates.

    Example:
        >>> import torch, covpool
        >>> A = covpool.testing.random_spd(2, n=8, dtype=torch.float32).requires_grad_()
        >>> m = measure(lambda: covpool.sqrtm(A, method="eigh"), [A], device=A.device, repeats=2)
        >>> m.forward.min <= m.forward_ms <= m.forward.max and m.saved_bytes > 0
        True
    """
    measurements, failures = measure_interleaved(
        {0: (forward, wrt)}, device=device, warmup=warmup, repeats=repeats
    )
    if failures:
        raise RuntimeError(failures[0])
    return measurements[0]
