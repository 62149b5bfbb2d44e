"""The one way the DDP tests start ranks: spawned CPU processes in a gloo group (file rendezvous), each
running a module-level ``compute(rank) -> dict`` and saving its result for the parent to compare."""

from __future__ import annotations

import datetime
import faulthandler
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 300
"""A rank that has not finished by then prints its stack and exits, so that a hang fails the test instead
of stalling the run (CI has a wall-clock limit)."""


def _worker(rank: int, compute: Callable[[int], dict[str, Any]], directory: str, world_size: int) -> None:
    faulthandler.dump_traceback_later(TIMEOUT_S, exit=True)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{directory}/init",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    torch.save(compute(rank), Path(directory) / f"rank{rank}.pt")
    dist.barrier()  # every rank has saved and left its last collective
    # No teardown: on torch 2.4, destroy_process_group with the file rendezvous blocked forever in one
    # rank of two, at random (seen twice in CI, once after a barrier). The process ends here, its result
    # saved, without running the group's or the store's destructors.
    os._exit(0)


def run_on_ranks(
    compute: Callable[[int], dict[str, Any]], directory: Path, world_size: int
) -> list[dict[str, Any]]:
    """``compute(rank)`` on each of ``world_size`` spawned ranks; their results, by rank. ``compute`` must
    be a module-level function (it is pickled by name); ``directory`` holds the rendezvous and results."""
    mp.spawn(_worker, args=(compute, str(directory), world_size), nprocs=world_size, join=True)
    return [torch.load(directory / f"rank{rank}.pt") for rank in range(world_size)]
