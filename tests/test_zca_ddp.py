"""ZCA batch norm under torch.distributed (2 CPU processes, gloo): equal to one process on the union batch.

One spawn serves every check of this file: the module-scoped fixture starts both ranks once, each rank
runs all scenarios and saves its results, and the tests compare them with the same computation done here
in a single process.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import run_on_ranks

from covpool import ZCABatchNorm1d, ZCABatchNorm2d
from covpool.functional import is_distributed

pytestmark = pytest.mark.ddp

WORLD_SIZE = 2
BATCH_SIZES = (3, 5)  # uneven per-rank batches
STEPS = 2
TOLERANCE = 1e-5


def _scenarios() -> dict[str, tuple[torch.nn.Module, list[torch.Tensor], list[torch.Tensor]]]:
    """Per scenario: a layer with random affine weights, union batches and loss projections per step."""
    generator = torch.Generator().manual_seed(1234)
    n = sum(BATCH_SIZES)

    def layer(cls, shape):
        module = cls(
            shape[-1] if cls is ZCABatchNorm1d else shape[1],
            group_size=4,
            eps=1e-3,
            momentum=0.3,
            dtype=torch.float64,
        )
        with torch.no_grad():
            module.weight.uniform_(0.5, 1.5, generator=generator)
            module.bias.normal_(generator=generator)
        inputs = [
            torch.randn(n, *shape[1:], generator=generator, dtype=torch.float64) * 2 + 1
            for _ in range(STEPS + 1)
        ]  # the last batch is for evaluation
        projections = [
            torch.randn(n, *shape[1:], generator=generator, dtype=torch.float64) for _ in range(STEPS)
        ]
        return module, inputs, projections

    return {
        "2d": layer(ZCABatchNorm2d, (n, 8, 3, 3)),
        "1d": layer(ZCABatchNorm1d, (n, 4, 8)),
    }


def _rank_slice(rank: int) -> slice:
    start = sum(BATCH_SIZES[:rank])
    return slice(start, start + BATCH_SIZES[rank])


def _run(module, inputs, projections, rows: slice, reduce_grads) -> dict[str, torch.Tensor]:
    """Train ``STEPS`` steps on ``inputs[step][rows]`` and evaluate on the last batch."""
    results = {}
    for step in range(STEPS):
        x = inputs[step][rows].clone().requires_grad_()
        out = module(x)
        (out * projections[step][rows]).sum().backward()
        results[f"out{step}"] = out.detach()
        results[f"grad{step}"] = x.grad
        results[f"weight_grad{step}"] = reduce_grads(module.weight.grad.clone())
        results[f"bias_grad{step}"] = reduce_grads(module.bias.grad.clone())
        module.zero_grad()
    results["running_mean"] = module.running_mean.clone()
    results["running_cov"] = module.running_cov.clone()
    results["eval"] = module.eval()(inputs[STEPS][rows])
    return results


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor)
    return tensor


def _on_rank(rank: int) -> dict[str, torch.Tensor]:
    results = {"distributed": torch.tensor(is_distributed())}
    for name, (module, inputs, projections) in _scenarios().items():
        for key, value in _run(module, inputs, projections, _rank_slice(rank), _all_reduce).items():
            results[f"{name}/{key}"] = value
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    return run_on_ranks(_on_rank, tmp_path_factory.mktemp("zca_ddp"), WORLD_SIZE)


@pytest.fixture(scope="module")
def single() -> dict[str, dict[str, torch.Tensor]]:
    return {name: _run(*case, slice(None), lambda t: t) for name, case in _scenarios().items()}


def test_ranks_see_a_distributed_run(ranks):
    assert all(bool(r["distributed"]) for r in ranks)


@pytest.mark.parametrize("name", ["2d", "1d"])
@pytest.mark.parametrize("step", range(STEPS))
def test_outputs_and_input_gradients_equal_union_batch(ranks, single, name, step):
    for rank, results in enumerate(ranks):
        rows = _rank_slice(rank)
        for key in (f"out{step}", f"grad{step}"):
            expected = single[name][key][rows]
            assert (results[f"{name}/{key}"] - expected).abs().max() <= TOLERANCE, (rank, key)


@pytest.mark.parametrize("name", ["2d", "1d"])
@pytest.mark.parametrize("step", range(STEPS))
def test_summed_parameter_gradients_equal_union_batch(ranks, single, name, step):
    for results in ranks:
        for key in (f"weight_grad{step}", f"bias_grad{step}"):
            assert (results[f"{name}/{key}"] - single[name][key]).abs().max() <= TOLERANCE, key


@pytest.mark.parametrize("name", ["2d", "1d"])
def test_running_statistics_agree_across_ranks(ranks, single, name):
    for results in ranks:
        for key in ("running_mean", "running_cov"):
            assert (results[f"{name}/{key}"] - single[name][key]).abs().max() <= TOLERANCE, key
    for rank, results in enumerate(ranks):
        expected = single[name]["eval"][_rank_slice(rank)]
        assert (results[f"{name}/eval"] - expected).abs().max() <= TOLERANCE
