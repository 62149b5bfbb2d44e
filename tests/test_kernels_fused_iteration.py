"""The fused Triton forward iteration (:mod:`covpool.kernels.fused_iteration`) against its reference.

Triton decides between compiling and interpreting a kernel when the kernel is decorated, from
``TRITON_INTERPRET``; setting it in this process would also turn every other Triton kernel of the session
(inductor's, on a GPU) into interpreted ones. So the kernel runs on CPU in one subprocess started with
``TRITON_INTERPRET=1`` (once per module, every case in that run), and the comparisons run here against
:data:`covpool.kernels.fused_iteration.reference`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from covpool import RootOptions
from covpool.kernels.fused_iteration import (
    reference,
    schedule_in_kernel,
    triton_available,
)
from covpool.linalg.iteration import passes_residual_test
from covpool.linalg.normalization import normalise
from covpool.linalg.numerics import symmetrize, with_relative_ridge
from covpool.linalg.options import RootPlan
from covpool.linalg.schedule import pade_schedule
from covpool.testing import random_covariance, random_spd, relative_error

AGREEMENT = {torch.float32: 2e-5}
"""Relative Frobenius distance allowed between kernel and reference per dtype (the kernel is float32 only)
at the plans' default condition bound, 1e3. Both run the same schedule and differ by rounding alone: the
order of the sums in each product, and the kernel's own Cholesky factorisation in Padé steps. Measured at
most 4.1e-6 (``Z``, n = 8 … 64)."""
ROUNDING_ROOM = 2.0
"""Where the ridge lets the condition reach 1e5 and more, float32 rounding alone moves ``Z`` by up to 7e-4
from the same schedule evaluated in float64, in the reference as much as in the kernel (measured: the
kernel's distance is 0.6 … 1.5 times the reference's): the kernel is held within this factor of the
reference's own distance."""

CASES = [(method, n, 0.0) for method in ("mtp", "mpa") for n in (8, 24, 32, 64)]
CASES += [("mtp", 24, 1e-4), ("mpa", 24, 1e-4)]
"""Default plans at condition 1e3 (Schatten-8 normalisation), and with a head's ridge (trace normalisation,
longer schedules: mtp's mixes degrees 3 and 2)."""
BATCH = 3

_RUN_KERNEL = """
import sys, torch
from covpool.kernels.fused_iteration import fused_coupled_root
cases = torch.load(sys.argv[1], weights_only=False)
torch.save({key: fused_coupled_root(*inputs) for key, inputs in cases.items()}, sys.argv[2])
"""

needs_triton = pytest.mark.skipif(not triton_available(), reason="needs triton")


def _plan(method: str, n: int, eps: float) -> RootPlan:
    return RootOptions(method=method).plan(n, eps=eps, device=torch.device("cpu"), dtype=torch.float32)


def _normalised_input(method: str, n: int, eps: float) -> torch.Tensor:
    """``Â`` as :class:`covpool.linalg.roots.MatmulRoot` forms it: random SPD at the plan's assumed
    condition without a ridge, rank-deficient covariances with one. Shape ``(BATCH, n, n)`` float32."""
    if eps == 0.0:
        A = random_spd(BATCH, n=n, condition=1e3, dtype=torch.float32)
    else:
        A = random_covariance(BATCH, n=n, samples=n // 2, dtype=torch.float32)
    return normalise(with_relative_ridge(symmetrize(A), eps), _plan(method, n, eps).normalization)[0]


@pytest.fixture(scope="module")
def kernel_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``{case: (Â, (Y, Z) from the kernel)}`` for every case of :data:`CASES`, from one interpreted run."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("fused_iteration")
    cases = {case: (_normalised_input(*case), _plan(*case).forward) for case in CASES}
    torch.save(cases, directory / "cases.pt")
    subprocess.run(
        [sys.executable, "-c", _RUN_KERNEL, str(directory / "cases.pt"), str(directory / "out.pt")],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        check=True,
        timeout=300,
    )
    outputs = torch.load(directory / "out.pt")
    return {case: (cases[case][0], outputs[case]) for case in CASES}


CASE_IDS = [f"{method}-n{n}-eps{eps:g}" for method, n, eps in CASES]


@needs_triton
class TestFusedForward:
    @pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
    def test_matches_the_reference_schedule(self, kernel_results, case):
        A_hat, (Y, Z) = kernel_results[case]
        schedule = _plan(*case).forward
        assert schedule_in_kernel(schedule)
        assert Y.shape == Z.shape == A_hat.shape and Y.dtype == Z.dtype == torch.float32
        expected = reference(A_hat, schedule)
        unrounded = reference(A_hat.double(), schedule)
        for name, kernel, ref, exact in zip("YZ", (Y, Z), expected, unrounded, strict=True):
            if case[2] == 0.0:
                assert relative_error(kernel, ref).max() <= AGREEMENT[torch.float32], name
            rounding = relative_error(ref, exact).max()
            assert relative_error(kernel, exact).max() <= ROUNDING_ROOM * rounding, name

    @pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
    def test_passes_the_plans_residual_test(self, kernel_results, case):
        A_hat, (Y, Z) = kernel_results[case]
        limit = _plan(*case).check.limit
        assert passes_residual_test(A_hat, Y, Z, limit, inverse=True).all()


class TestDispatch:
    def test_pade_steps_beyond_direct_sums_are_left_to_the_reference(self):
        assert schedule_in_kernel(pade_schedule(0.03, 1.0, 1e-3, degree=4))
        assert not schedule_in_kernel(pade_schedule(0.03, 1.0, 1e-3, degree=5))
