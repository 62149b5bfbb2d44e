"""The studies behind the library's constants (``examples/studies``), run as scripts at small sizes: each
writes its results file, whose rows are checked against the models, bounds and constants they justify.

The tests import no study code: each study runs once per module in a subprocess (one thread), and the
tests read the JSON it wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from covpool.linalg.certify import TRACE_ROUNDING
from covpool.linalg.mixed import INVERSE_GROWTH, ROOT_GROWTH, TF32_DOMAIN, VALID_RESIDUAL_GROWTH

STUDIES = Path(__file__).resolve().parents[1] / "examples" / "studies"
NAMES = ("rounding", "mixed", "tf32_fit", "beyond")


def _command(name: str, *args: str) -> list[str]:
    return [sys.executable, str(STUDIES / f"{name}.py"), *args]


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run_study(name: str, out: Path, *args: str) -> tuple[str, dict]:
    """Run ``examples/studies/<name>.py`` with ``args`` into ``out``: its stdout and ``<name>.json``."""
    done = subprocess.run(
        _command(name, *args, "--out", str(out), "--threads", "1", "--no-progress"),
        capture_output=True,
        text=True,
        env=_environment(),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout, json.loads((out / f"{name}.json").read_text())


def test_every_study_has_help() -> None:
    runs = {
        name: subprocess.Popen(
            _command(name, "--help"), stdout=subprocess.PIPE, text=True, env=_environment()
        )
        for name in NAMES
    }
    for name, process in runs.items():
        out, _ = process.communicate(timeout=600)
        assert process.returncode == 0
        assert f"python examples/studies/{name}.py" in out and "--out" in out and "--sizes" in out


@pytest.fixture(scope="module")
def rounding(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("rounding")
    return run_study("rounding", out, "--sizes", "32", "--tables", "backward", "input", "--input-batch", "4")


class TestRounding:
    def test_each_backward_where_it_is_the_accurate_one(self, rounding: tuple[str, dict]) -> None:
        printed, results = rounding
        rows = results["rows"]
        assert len(rows) == 8  # two sample counts × four ridges
        assert "largest lyapunov / (u kappa)" in printed
        by_case = {(row["samples"], row["eps"]): row for row in rows}
        # Rank-deficient (8 positions) with a small ridge: the Lyapunov gradient is off by about the model's
        # figure, the unrolled one (the default there) is not.
        deficient = by_case[(8, 1e-5)]
        assert deficient["default"] == "adjoint"
        assert deficient["unrolled_range"] < 1e-3 < deficient["lyapunov_range"] <= deficient["model"]
        # Rounding grows with κ: below 1e5 the Lyapunov gradient meets tol and stays the default.
        assert all(
            row["lyapunov_range"] < 1e-3 and row["default"] == "lyapunov"
            for row in rows
            if row["eps"] >= 1e-3
        )

    def test_input_rounding_stays_within_the_traces_room(self, rounding: tuple[str, dict]) -> None:
        printed, results = rounding
        rows = results["input_rounding"]
        assert len(rows) == 6 * 4  # n = 16 … 512 × 8 or 49 positions × two channel profiles
        # Rank-deficient inputs (8 positions) sit on the bound, so rounding puts some of them below it.
        assert max(row["below_bound_in_u"] for row in rows) > 0.0
        assert all(row["below_bound_in_u"] <= TRACE_ROUNDING for row in rows)
        assert results["heads"] == [] and results["trace"] == []  # not asked for
        assert f"the trace's bound leaves {TRACE_ROUNDING:g} u" in printed


def test_mixed_separates_refined_from_low_precision_configurations(tmp_path: Path) -> None:
    printed, results = run_study("mixed", tmp_path, "--sizes", "32")
    assert "spd: cheapest with forward and gradient <= 0.001: refine" in printed
    assert (tmp_path / "mixed.csv").stat().st_size > 0
    cell = {(row["input"], row["config"], row["format"]): row for row in results["rows"]}
    reference = cell[("spd", "float32", "float32")]
    assert reference["meets"] and reference["low"] == 0
    # every product of the plan in bfloat16 misses tol; two float32 refinements of the forward and two of
    # the backward meet it with room, cheaper
    assert not cell[("spd", "all", "bf16")]["meets"]
    assert cell[("spd", "all", "bf16")]["low"] == reference["float32"]
    refined = cell[("spd", "refine 2/2", "bf16")]
    assert max(refined["forward"], refined["inverse"], refined["gradient"]) <= 1e-4
    assert refined["cost"] < reference["cost"]
    assert refined["cost"] == refined["float32"] + refined["low"] / 10
    # the plan precision="tf32" runs: within its fitted model, which bfloat16 has none of; two refinements
    # are no longer certified
    planned = cell[("spd", "refine 3/1", "tf32")]
    assert cell[("spd", "refine 2/1", "tf32")]["model_forward"] is None
    assert planned["forward"] <= planned["model_forward"] < 1e-3
    assert planned["gradient"] <= planned["model_gradient"] < 1e-3
    assert refined["model_gradient"] is None  # inf, written as null


def test_tf32_fit_stays_within_the_certificate_and_shows_where_it_ends(tmp_path: Path) -> None:
    printed, results = run_study("tf32_fit", tmp_path, "--sizes", "16")
    rows = results["rows"]
    # kinds × conditions × two seeds below n = 512 × refinement counts × roundings of the TF32 operands
    assert len(rows) == 3 * 4 * 2 * 3 * 3
    assert {row["rounding"] for row in rows} == {"nearest-even", "nearest-away", "truncation"}
    assert (tmp_path / "tf32_fit.csv").exists()
    assert (tmp_path / "tf32_fit.png").read_bytes()[:4] == b"\x89PNG"
    fitted = [row for row in rows if row["fitted"]]
    assert {row["condition"] for row in fitted} == {1e2, 1e3, 1e4}
    assert all(row["t"] <= TF32_DOMAIN for row in fitted)
    model = {
        "root/t": ROOT_GROWTH,
        "inverse/t²": INVERSE_GROWTH,
        "gradient/t²": INVERSE_GROWTH,
        "residual/t²": VALID_RESIDUAL_GROWTH,
    }
    certified = [row for row in fitted if row["certified"]]
    assert {row["plan"] for row in certified} == {"3/1", "3/2"}
    for ratio, constant in model.items():
        assert all(row[ratio] <= constant for row in certified), ratio
    # the room table: per rounding and the worst of them, on the certified plans, and the plan 2/1 apart
    room = {(entry["rounding"], entry["ratio"]): entry for entry in results["room"]}
    assert set(room) == {
        (r, ratio) for r in ("nearest-even", "nearest-away", "truncation", "every") for ratio in model
    }
    for (rounding, ratio), entry in room.items():
        worst = max(row[ratio] for row in certified if rounding in ("every", row["rounding"]))
        assert entry["measured"] == worst and entry["room"] == model[ratio] / worst
    assert {entry["rounding"] for entry in results["room_2_1"]} == {r for r, _ in room}
    assert "not certified plans 2/1" in printed
    # condition 1e5 is outside: there the gradient misses 1e-2 (or is NaN, written as null)
    outside = [row["gradient"] for row in rows if not row["fitted"]]
    assert any(gradient is None or not gradient <= 1e-2 for gradient in outside)
    assert "beyond the range" in printed


@pytest.fixture(scope="module")
def beyond(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    return run_study("beyond", tmp_path_factory.mktemp("beyond"), "--sizes", "32")


class TestBeyondTheBound:
    def test_prints_counts_and_writes_every_case(self, beyond: tuple[str, dict]) -> None:
        printed, results = beyond
        rows = results["rows"]
        assert len(rows) == 2 * 4 * 4 * 2 * 2  # kinds × conditions × methods × dtypes × functions
        assert "silently wrong" in printed and "(128 cases)" in printed
        assert not any(r["verdict"] == "silently wrong" for r in rows), printed

    def test_each_verdict_is_what_the_root_did(self, beyond: tuple[str, dict]) -> None:
        _, results = beyond
        case = {
            (r["kind"], r["condition"], r["dtype"], r["method"], r["function"]): r
            for r in results["rows"]
            if r["n"] == 32
        }
        # mtp at κ = 1e6 where 1e3 is assumed: every matrix flagged, none wrong
        assert case[("spd", 1e6, "float64", "mtp", "sqrtm")]["verdict"] == "flagged"
        within = case[("spd", 1e6, "float64", "auto", "sqrtm")]  # eigh on CPU: exact
        assert within["verdict"] == "within" and within["gradient"] < 1e-8
        row = case[("ridged", 1e3, "float32", "mpa", "inv_sqrtm")]
        assert row["verdict"] == "within" and row["forward"] < 2e-3 and row["gradient"] < 2e-3
        # the TF32 plan: flagged beyond its bound, refused in float64
        assert case[("ridged", 1e5, "float32", "tf32", "sqrtm")]["verdict"] == "flagged"
        refused = case[("ridged", 1e5, "float64", "tf32", "sqrtm")]
        assert refused["verdict"] == "refused" and "float64" in refused["why"]

    def test_only_the_working_dtypes(self) -> None:
        done = subprocess.run(
            _command("beyond", "--dtype", "float16"), capture_output=True, text=True, env=_environment()
        )
        assert done.returncode == 2 and "invalid choice: 'float16'" in done.stderr
