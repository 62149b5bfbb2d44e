"""The CUDA code path traced on any machine (fake CUDA tensors): host syncs, products, kernels."""

from __future__ import annotations

import pytest
import torch

import covpool
from covpool.bench.trace import FAKE_CUDA_SUPPORTED, trace_root
from covpool.linalg.planner import plan_root

pytestmark = pytest.mark.skipif(
    not FAKE_CUDA_SUPPORTED,
    reason="fake CUDA tensors abort the process before torch 2.11 (seen with 2.4); 2.11 and 2.14 tested",
)

ROOTS = {"sqrtm": covpool.sqrtm, "inv_sqrtm": covpool.inv_sqrtm}


@pytest.mark.parametrize("name", ROOTS)
@pytest.mark.parametrize(
    "options", [{}, {"method": "mtp", "eps": 1e-4}, {"method": "mpa"}, covpool.PAPER_CONFIG], ids=str
)
def test_default_cuda_path_never_synchronises(name, options):
    assert trace_root(lambda a: ROOTS[name](a, **options), n=32, batch=8).syncs == 0


def test_checks_requested_on_cuda_synchronise_and_say_so():
    assert trace_root(lambda a: covpool.sqrtm(a, check_input=True), n=8, batch=2).syncs == 1


def test_products_and_kernels_of_the_default_square_root():
    result = trace_root(covpool.sqrtm, n=64, batch=64)
    assert result.products <= 80
    # Per product: 1 kernel per polynomial product, ~1.3 in the sign steps, plus a fixed overhead
    # (normalisation, residual test, scaling) of about 33 kernels per call; measured 1.70 (80 / 47).
    assert result.kernels_per_product <= 1.72
    # one identity for the first step's q(Â), one for the residual Z Y - I
    assert result.forward.ops["aten.eye"] <= 2 and result.backward.ops["aten.eye"] == 0


def test_looser_tolerance_traces_fewer_products():
    def products(tol):
        return trace_root(lambda a: covpool.sqrtm(a, tol=tol), n=64, batch=4).products

    # at n = 64 tol=1e-2 costs as much as 1e-3: the forward is held tighter so that a valid input passes
    # the residual test with room
    assert products(1e-2) <= products(1e-3) < products(1e-5)


@pytest.mark.parametrize("name", ROOTS)
def test_the_tf32_plan_is_sync_free_and_runs_its_planned_products(name):
    """The mixed plan's TF32 phases only set torch's flags: no sync. Its products: the plan's, the
    normalisation's two, the a-posteriori test's eight, and for the inverse root ``Z G Z`` (two)."""
    from covpool.linalg import precision

    options = covpool.RootOptions(method="mtp", precision="tf32")
    result = trace_root(lambda a: ROOTS[name](a, options), n=64, batch=8)
    plan = plan_root(options, 64, eps=0.0, device=torch.device("cuda"), dtype=torch.float32)
    assert result.syncs == 0
    assert result.products == plan.products() + 2 + 8 + (2 if name == "inv_sqrtm" else 0)
    assert (precision._depth, precision._tf32_owner) == (0, None)
