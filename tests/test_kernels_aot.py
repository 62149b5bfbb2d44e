"""The fused kernels compiled ahead of time, and the certificate of their split-TF32 products.

:mod:`covpool.kernels.aot` compiles every kernel at every tile the planner dispatches for sm_80, sm_90 and
sm_100 with Triton's own ptxas (no GPU): none may spill, and every one must form its products on tensor
cores. Run with ``-s`` to see the table (registers, spills, shared memory per kernel, tile and GPU).

The kernels' products are ``tf32x3``, certified at :data:`covpool.kernels.fused_iteration.SPLIT_EPSILON`
(the derivation is its docstring): here the reference schedules certified there run under
:func:`covpool.linalg.emulation.emulated_products` ``("tf32x3")``, Triton's split emulated on CPU, within
those certificates. The interpreter (``tests/test_kernels_fused_iteration.py``) forms float32 products
whatever ``input_precision`` says, so it checks the kernels' schedule, and this file their rounding.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import covpool
from covpool import RootOptions
from covpool.bench.trace import FAKE_CUDA_SUPPORTED
from covpool.kernels import MAX_N, fused_iteration, triton_available
from covpool.kernels.fused_iteration import SPLIT_EPSILON
from covpool.linalg import planner
from covpool.linalg.certify import certify
from covpool.linalg.emulation import TF32X3_ROUNDOFF, emulated_products, split_product
from covpool.linalg.iteration import coupled_root, passes_residual_test
from covpool.linalg.lyapunov import rounding_error, solve_lyapunov
from covpool.linalg.normalization import normalise
from covpool.numerics import symmetrize
from covpool.testing import random_spd, reference_gradient, reference_root, relative_error

FLOAT32 = torch.finfo(torch.float32).eps


def _triton_version() -> tuple[int, ...]:
    import triton

    return tuple(int(part) for part in triton.__version__.split(".")[:2])


@pytest.fixture(scope="module")
def compiled() -> list:
    """Every dispatched configuration at the kernels' precision, compiled once for the module (about two
    minutes on one core)."""
    if not triton_available():
        pytest.skip("needs triton")
    if os.environ.get("TRITON_INTERPRET") == "1" or _triton_version() < (3, 8):
        pytest.skip("needs compiled (not interpreted) kernels and triton >= 3.8's compile API")
    from covpool.kernels import aot

    rows = aot.table(jobs=2)
    print("\n" + aot.format_table(rows))
    return rows


class TestAheadOfTime:
    def test_every_dispatched_configuration_is_compiled(self, compiled):
        from covpool.kernels import aot

        tiles = {fused_iteration.tile_size(n) for n in range(1, MAX_N + 1)}
        assert {(row.kernel, row.block, row.arch) for row in compiled} == {
            (kernel, tile, arch) for kernel in aot.KERNELS for tile in tiles for arch in aot.ARCHS
        }
        assert {row.precision for row in compiled} == {fused_iteration.INPUT_PRECISION}

    def test_no_kernel_spills(self, compiled):
        spilled = [(row.kernel, row.block, row.arch, row.spill_stores, row.spill_loads) for row in compiled]
        assert [row for row in spilled if row[3] or row[4]] == []

    def test_products_run_on_tensor_cores(self, compiled):
        # Hopper's warpgroup MMA and Blackwell's tcgen05 need 64 rows a warpgroup: smaller tiles use mma.sync
        for row in compiled:
            expected = {80: "mma.sync", 90: "wgmma.mma_async", 100: "tcgen05.mma"}[row.arch]
            assert row.tensor_cores == ((expected,) if row.block >= 64 else ("mma.sync",)), row

    def test_shared_memory_fits_every_gpu(self, compiled):
        assert max(row.shared for row in compiled) <= 99 * 1024  # sm_80's opt-in limit is 163 KB a block

    def test_command_line_passes_its_arguments_and_counts_spills(self, compiled, monkeypatch, capsys):
        from covpool.kernels import aot

        calls = []
        monkeypatch.setattr(aot, "table", lambda *args: calls.append(args) or compiled)
        aot.main(["--arch", "90", "--precision", "ieee", "--jobs", "3"])
        assert calls == [(("ieee",), (90,), 3)]
        printed = capsys.readouterr().out
        assert aot.format_table(compiled) in printed
        assert f"{len(compiled)} configurations compiled, 0 with spills" in printed


def _fused_schedules(method: str, n: int):
    """What a fused call on CUDA runs: the schedules certified at :data:`SPLIT_EPSILON`."""
    return certify(RootOptions(method=method), method, n, 0.0, SPLIT_EPSILON, "full")


def _certified_case(method: str, n: int):
    """``(schedules, Â)``: :func:`_fused_schedules` (the test is skipped where they refuse) and a batch of
    four normalised float32 inputs of condition 1e3, seeded by ``n``."""
    try:
        schedules = _fused_schedules(method, n)
    except ValueError:
        pytest.skip("not certified at SPLIT_EPSILON: the planner leaves the call to the reference")
    torch.manual_seed(n)
    A = random_spd(4, n=n, condition=1e3, dtype=torch.float32)
    return schedules, normalise(symmetrize(A), schedules.normalization)[0]


class TestSplitCertificate:
    def test_effective_epsilon_covers_the_split(self):
        u = FLOAT32 / 2
        assert SPLIT_EPSILON == 2 * (u + TF32X3_ROUNDOFF["truncation"])
        assert 21 * FLOAT32 <= SPLIT_EPSILON <= 21.01 * FLOAT32

    @pytest.mark.parametrize("n", [16, 64, 100])
    def test_a_split_product_is_within_the_float32_model_at_the_effective_epsilon(self, n):
        torch.manual_seed(n)
        A, B = torch.randn(4, n, n), torch.randn(4, n, n)
        exact = A.double() @ B.double()
        u = SPLIT_EPSILON / 2
        gamma = n * u / (1 - n * u)
        bound = gamma * (A.double().abs() @ B.double().abs())
        assert ((split_product(A, B).double() - exact).abs() <= bound).all()

    @pytest.mark.parametrize("method", ["mtp", "mpa"])
    @pytest.mark.parametrize("n", [8, 32, 64])
    def test_emulated_forward_passes_the_certified_residual_test(self, method, n):
        schedules, A_hat = _certified_case(method, n)
        with emulated_products("tf32x3") as mode:
            Y, Z = coupled_root(A_hat, schedules.forward)
        assert mode.products > 0
        assert passes_residual_test(A_hat, Y, Z, schedules.check.limit, inverse=True).all()
        exact = reference_root(A_hat.double())
        assert relative_error(Y, exact).max() <= schedules.check.certifies

    @pytest.mark.parametrize("method", ["mtp", "mpa"])
    @pytest.mark.parametrize("n", [8, 32, 64])
    def test_emulated_sign_iteration_is_within_its_certified_bound(self, method, n):
        schedules, A_hat = _certified_case(method, n)
        Y = reference_root(A_hat.double()).float()
        C = symmetrize(torch.randn(4, n, n))
        with emulated_products("tf32x3") as mode:
            X = solve_lyapunov(Y, C, schedules.backward)
        assert mode.products > 0
        exact = reference_gradient(Y.double() @ Y.double(), C.double())
        backward = schedules.backward
        assert relative_error(X, exact).max() <= backward.error + rounding_error(
            backward.lower, SPLIT_EPSILON
        )


@pytest.mark.skipif(not FAKE_CUDA_SUPPORTED, reason="fake CUDA tensors abort torch < 2.11")
class TestFusedPlans:
    @pytest.fixture(autouse=True)
    def _real_kernels(self, monkeypatch):
        monkeypatch.setattr(planner, "_PLANS", {})
        monkeypatch.setattr(planner, "is_fake", lambda tensor: False)
        monkeypatch.setattr(covpool.kernels, "triton_available", lambda: True)

    @staticmethod
    def _plan(method: str, n: int) -> planner.RootPlan:
        with FakeTensorMode():
            A = torch.empty(2, n, n, device="cuda")
        return planner.plan_call(RootOptions(method=method, fused=True), A, 0.0)

    @pytest.mark.parametrize("n", [8, 32, MAX_N])
    def test_fused_plans_run_the_schedules_certified_at_the_split_epsilon(self, n):
        plan = self._plan("mtp", n)
        assert plan.fused_forward and plan.fused_backward
        schedules = _fused_schedules("mtp", n)
        assert (plan.forward, plan.backward, plan.check) == (
            schedules.forward,
            schedules.backward,
            schedules.check,
        )

    def test_plans_the_split_does_not_certify_take_the_reference(self):
        with pytest.raises(ValueError):  # mpa's model at n = 16: the Cholesky solves' u / lower² term
            _fused_schedules("mpa", 16)
        plan = self._plan("mpa", 16)
        assert not plan.fused_forward and not plan.fused_backward
        assert plan.forward == certify(RootOptions(method="mpa"), "mpa", 16, 0.0, FLOAT32, "full").forward
