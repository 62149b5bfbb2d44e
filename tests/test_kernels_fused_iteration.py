"""The fused Triton kernels (:mod:`covpool.kernels`) against their references: the forward iteration
(:mod:`covpool.kernels.fused_iteration`) and the Lyapunov sign iteration
(:mod:`covpool.kernels.fused_lyapunov`).

Triton decides between compiling and interpreting a kernel when the kernel is decorated, from
``TRITON_INTERPRET``; setting it in this process would also turn every other Triton kernel of the session
(inductor's, on a GPU) into interpreted ones. So the kernels run on CPU in one subprocess started with
``TRITON_INTERPRET=1`` (once per module, every case in that run), and the comparisons run here against
each module's ``reference``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import covpool
from covpool import PAPER_CONFIG, RootOptions
from covpool.bench.trace import FAKE_CUDA_SUPPORTED
from covpool.kernels import MAX_N, fused_iteration, fused_lyapunov, triton_available
from covpool.linalg import planner
from covpool.linalg.iteration import passes_residual_test
from covpool.linalg.lyapunov import rounding_error
from covpool.linalg.normalization import normalise
from covpool.linalg.planner import RootPlan, plan_call, plan_root
from covpool.linalg.schedule import pade_schedule
from covpool.numerics import symmetrize, with_relative_ridge
from covpool.testing import random_covariance, random_spd, reference_gradient, reference_root, relative_error

AGREEMENT = {torch.float32: 2e-5}
"""Relative Frobenius distance allowed between kernel and reference per dtype (the kernels are float32
only) at the plans' default condition bound, 1e3. Both run the same schedule and differ by rounding alone:
the order of the sums in each product, and the forward kernel's own Cholesky factorisation in Padé steps.
Measured at most 4.1e-6 (forward, ``Z``; n = 8 … 64) and 1.4e-6 (backward)."""
ROUNDING_ROOM = 2.0
"""Where the ridge lets the condition reach 1e5 and more, float32 rounding alone moves ``Z`` by up to 7e-4
from the same schedule evaluated in float64, in the reference as much as in the kernel (measured: the
kernel's distance is 0.6 … 1.5 times the reference's): the kernel is held within this factor of the
reference's own distance."""

CASES = [(method, n, 0.0) for method in ("mtp", "mpa") for n in (8, 24, 32, 64)]
CASES += [("mtp", 24, 1e-4), ("mpa", 24, 1e-4)]
"""Default plans at condition 1e3 (Schatten-8 normalisation), and with a head's ridge (trace normalisation,
longer forward schedules: mtp's mixes degrees 3 and 2). The backward cases are those whose plan has a
Lyapunov backward (the ridged ones differentiate through their steps), plus the paper's 8 Newton-Schulz
steps."""
BACKWARD_CASES = [case for case in CASES if case[2] == 0.0] + [("paper", 32, 0.0)]
BATCH = 3

_RUN_KERNELS = """
import sys, torch
from covpool.kernels.fused_iteration import fused_coupled_root
from covpool.kernels.fused_lyapunov import fused_solve_lyapunov
cases = torch.load(sys.argv[1], weights_only=False)
kernels = {"forward": fused_coupled_root, "backward": fused_solve_lyapunov}
torch.save({key: kernels[key[0]](*inputs) for key, inputs in cases.items()}, sys.argv[2])
"""

needs_triton = pytest.mark.skipif(not triton_available(), reason="needs triton")


def _plan(method: str, n: int, eps: float) -> RootPlan:
    options = RootOptions(**PAPER_CONFIG) if method == "paper" else RootOptions(method=method)
    return plan_root(options, n, eps=eps, device=torch.device("cpu"), dtype=torch.float32)


def _normalised_input(method: str, n: int, eps: float) -> torch.Tensor:
    """``Â`` as :class:`covpool.linalg.roots.MatmulRoot` forms it: random SPD at the plan's assumed
    condition without a ridge, rank-deficient covariances with one. Shape ``(BATCH, n, n)`` float32."""
    if eps == 0.0:
        A = random_spd(BATCH, n=n, condition=1e3, dtype=torch.float32)
    else:
        A = random_covariance(BATCH, n=n, samples=n // 2, dtype=torch.float32)
    return normalise(with_relative_ridge(symmetrize(A), eps), _plan(method, n, eps).normalization)[0]


def _lyapunov_input(method: str, n: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Y, C)``: the root of an ``Â`` and a symmetric right-hand side, ``(BATCH, n, n)`` float32 each."""
    Y = reference_root(_normalised_input(method, n, eps).double()).float()
    return Y, symmetrize(torch.randn(BATCH, n, n))


@pytest.fixture(scope="module")
def kernel_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``{(direction, *case): (inputs, kernel output)}`` for every case, from one interpreted run:
    forward ``(Â, schedule) → (Y, Z)``, backward ``(Y, C, schedule) → X``."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("fused_kernels")
    cases = {("forward", *case): (_normalised_input(*case), _plan(*case).forward) for case in CASES}
    for case in BACKWARD_CASES:
        cases["backward", *case] = (*_lyapunov_input(*case), _plan(*case).backward)
    torch.save(cases, directory / "cases.pt")
    subprocess.run(
        [sys.executable, "-c", _RUN_KERNELS, str(directory / "cases.pt"), str(directory / "out.pt")],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        check=True,
        timeout=300,
    )
    outputs = torch.load(directory / "out.pt")
    return {key: (cases[key], outputs[key]) for key in cases}


def _ids(cases: list[tuple[str, int, float]]) -> list[str]:
    return [f"{method}-n{n}-eps{eps:g}" for method, n, eps in cases]


def _assert_matches(kernel: torch.Tensor, expected: torch.Tensor, unrounded: torch.Tensor, *, ridged: bool):
    """Within :data:`AGREEMENT` of the reference (unridged), and within :data:`ROUNDING_ROOM` times the
    reference's distance to the same schedule in float64. Shapes ``(*, n, n)``."""
    assert kernel.shape == expected.shape and kernel.dtype == torch.float32
    if not ridged:
        assert relative_error(kernel, expected).max() <= AGREEMENT[torch.float32]
    rounding = relative_error(expected, unrounded).max()
    assert relative_error(kernel, unrounded).max() <= ROUNDING_ROOM * rounding


@needs_triton
class TestFusedForward:
    @pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
    def test_matches_the_reference_schedule(self, kernel_results, case):
        (A_hat, schedule), (Y, Z) = kernel_results["forward", *case]
        assert fused_iteration.schedule_in_kernel(schedule)
        expected = fused_iteration.reference(A_hat, schedule)
        unrounded = fused_iteration.reference(A_hat.double(), schedule)
        for kernel, ref, exact in zip((Y, Z), expected, unrounded, strict=True):
            _assert_matches(kernel, ref, exact, ridged=case[2] > 0.0)

    @pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
    def test_passes_the_plans_residual_test(self, kernel_results, case):
        (A_hat, _), (Y, Z) = kernel_results["forward", *case]
        limit = _plan(*case).check.limit
        assert passes_residual_test(A_hat, Y, Z, limit, inverse=True).all()


@needs_triton
class TestFusedLyapunov:
    @pytest.mark.parametrize("case", BACKWARD_CASES, ids=_ids(BACKWARD_CASES))
    def test_matches_the_reference_schedule(self, kernel_results, case):
        (Y, C, schedule), X = kernel_results["backward", *case]
        assert fused_lyapunov.schedule_in_kernel(schedule)
        expected = fused_lyapunov.reference(Y, C, schedule)
        unrounded = fused_lyapunov.reference(Y.double(), C.double(), schedule)
        _assert_matches(X, expected, unrounded, ridged=False)

    @pytest.mark.parametrize("case", BACKWARD_CASES, ids=_ids(BACKWARD_CASES))
    def test_is_within_the_schedules_bound_of_the_exact_solution(self, kernel_results, case):
        (Y, C, schedule), X = kernel_results["backward", *case]
        exact = reference_gradient(Y.double() @ Y.double(), C.double())  # Y X + X Y = C, by eigh
        bound = schedule.error + rounding_error(schedule.lower, torch.finfo(torch.float32).eps)
        assert relative_error(X, exact).max() <= bound


class TestDispatch:
    def test_cpu_tensors_take_the_reference(self, monkeypatch):
        A = random_spd(2, n=32, dtype=torch.float32).requires_grad_()
        plan = plan_call(RootOptions(method="mtp", fused=True), A, 0.0)
        assert not plan.fused_forward and not plan.fused_backward

        def refuse(*args: object) -> None:
            raise AssertionError("a fused kernel was launched on CPU tensors")

        monkeypatch.setattr(fused_iteration, "fused_coupled_root", refuse)
        monkeypatch.setattr(fused_lyapunov, "fused_solve_lyapunov", refuse)
        for method in ("mtp", "mpa"):
            covpool.sqrtm(A, method=method, fused=True).sum().backward()
        assert torch.isfinite(A.grad).all()

    @pytest.mark.skipif(not FAKE_CUDA_SUPPORTED, reason="fake CUDA tensors abort torch < 2.11")
    def test_decision_on_cuda_tensors(self, monkeypatch):
        def fake_cuda(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            with FakeTensorMode():
                return torch.empty(2, n, n, dtype=dtype, device="cuda")

        def plan(A: torch.Tensor, **options: object) -> RootPlan:
            return plan_call(RootOptions(method="mtp", **{"fused": True, **options}), A, 0.0)

        monkeypatch.setattr(planner, "_PLANS", {})  # plans cached under the real triton_available
        assert not plan(fake_cuda(32)).fused_forward  # fake tensors (the trace) take the reference
        monkeypatch.setattr(planner, "is_fake", lambda tensor: False)
        monkeypatch.setattr(covpool.kernels, "triton_available", lambda: True)
        assert plan(fake_cuda(32)).fused_forward and plan(fake_cuda(32)).fused_backward
        off = plan(fake_cuda(32), fused=None)  # the default until the kernels are measured on a GPU
        assert not off.fused_forward and not off.fused_backward
        assert plan(fake_cuda(MAX_N)).fused_forward
        assert not plan(fake_cuda(MAX_N + 1)).fused_forward
        assert not plan(fake_cuda(32, torch.float64)).fused_forward
        unrolled = plan(
            fake_cuda(32), backward="unrolled"
        )  # the fused adjoint needs the reference's iterates
        assert not unrolled.fused_forward and not unrolled.fused_backward

    def test_pade_steps_beyond_direct_sums_are_left_to_the_reference(self):
        assert fused_iteration.schedule_in_kernel(pade_schedule(0.03, 1.0, 1e-3, degree=4))
        assert not fused_iteration.schedule_in_kernel(pade_schedule(0.03, 1.0, 1e-3, degree=5))

    @pytest.mark.cuda
    @needs_triton
    def test_cuda_float32_takes_the_kernels_and_matches(self, monkeypatch):
        A = random_spd(5, n=48, dtype=torch.float32, device="cuda").requires_grad_()
        G = torch.randn_like(A)

        def root_and_gradient() -> tuple[torch.Tensor, torch.Tensor]:
            out = covpool.sqrtm(A, method="mtp", fused=True)
            (grad,) = torch.autograd.grad(out, A, G)
            return out.detach(), grad

        monkeypatch.setattr(planner, "_PLANS", {})
        monkeypatch.setattr(planner, "_fused", lambda *args: (False, False))
        expected = root_and_gradient()
        monkeypatch.undo()
        monkeypatch.setattr(planner, "_PLANS", {})
        launched = []
        for module, name in (
            (fused_iteration, "fused_coupled_root"),
            (fused_lyapunov, "fused_solve_lyapunov"),
        ):
            launch = getattr(module, name)
            monkeypatch.setattr(
                module, name, lambda *args, launch=launch: launched.append(launch) or launch(*args)
            )
        for value, reference in zip(root_and_gradient(), expected, strict=True):
            assert relative_error(value, reference).max() <= AGREEMENT[torch.float32]
        assert len(launched) == 2
