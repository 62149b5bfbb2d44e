"""Tests of `python -m covpool.bench`: its pieces on reference values, and a tiny smoke run."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from covpool.bench.__main__ import main
from covpool.bench.budget import run_within_budget
from covpool.bench.configs import CONFIGS
from covpool.bench.grid import accuracy, plan_grid
from covpool.bench.layers import run_layers
from covpool.bench.plot import pareto_front
from covpool.bench.report import format_table
from covpool.bench.timing import measure, saved_tensor_bytes
from covpool.testing import random_spd

# The square-root-only peer exists only where torch has torch.linalg.matrix_sqrth (not in torch 2.4).
HAS_MATRIX_SQRTH = "matrix_sqrth" in CONFIGS


class TestPieces:
    def test_pareto_front_keeps_exactly_the_non_dominated_points(self):
        points = [(1e-3, 5.0), (1e-6, 9.0), (1e-4, 20.0), (1e-2, 1.0), (1e-3, 6.0), (1e-1, 1.0)]
        assert pareto_front(points) == [(1e-6, 9.0), (1e-3, 5.0), (1e-2, 1.0)]

    def test_saved_bytes_counts_saved_storages_but_not_the_inputs(self):
        x = torch.randn(10, 20, requires_grad=True)
        # exp saves its output (800 bytes); x @ x.mT saves x, which is an input and not counted.
        assert saved_tensor_bytes(lambda: x.exp(), exclude=[x]) == 10 * 20 * 4
        assert saved_tensor_bytes(lambda: x @ x.mT, exclude=[x]) == 0
        assert saved_tensor_bytes(lambda: x @ x.mT) == 10 * 20 * 4

    def test_measure_reports_positive_times(self):
        A = random_spd(2, n=8, dtype=torch.float32).requires_grad_()
        result = measure(lambda: A.exp(), [A], device=A.device, warmup=0, repeats=2)
        assert result.forward_ms > 0 and result.forward_backward_ms > 0
        assert result.saved_bytes == A.numel() * 4
        assert result.peak_bytes is None

    @pytest.mark.parametrize("inverse", [False, True])
    def test_accuracy_separates_exact_and_inaccurate_configurations(self, inverse):
        A = random_spd(3, n=16, condition=1e3, dtype=torch.float64)
        forward_error, gradient_error = accuracy(CONFIGS["eigh-autograd"], A, inverse=inverse)
        assert forward_error < 1e-10 and gradient_error < 1e-8
        # Three Newton-Schulz steps cannot resolve eigenvalues down to 1e-3.
        forward_error, gradient_error = accuracy(CONFIGS["ns3"], A, inverse=inverse)
        assert forward_error > 1e-2 and gradient_error > 1e-2

    @pytest.mark.skipif(not HAS_MATRIX_SQRTH, reason="this torch has no torch.linalg.matrix_sqrth")
    def test_plan_grid_orders_cells_and_leaves_out_missing_inverses(self):
        cells, unsupported = plan_grid(
            configs=["mpa", "matrix_sqrth"],
            functions=["sqrtm", "inv_sqrtm"],
            devices=["cpu"],
            dtypes=["float32"],
            sizes=[64, 32],
            batches=[1],
        )
        assert [(cell.n, cell.function, cell.config) for cell in cells] == [
            (32, "sqrtm", "mpa"),
            (32, "sqrtm", "matrix_sqrth"),
            (32, "inv_sqrtm", "mpa"),
            (64, "sqrtm", "mpa"),
            (64, "sqrtm", "matrix_sqrth"),
            (64, "inv_sqrtm", "mpa"),
        ]
        assert [(cell.n, cell.config) for cell in unsupported] == [(32, "matrix_sqrth"), (64, "matrix_sqrth")]

    def test_budget_stops_starting_items_and_failures_become_rows(self):
        def run(item: int) -> dict:
            if item == 1:
                raise RuntimeError("out of memory\nmore detail")
            return {"item": item}

        rows, skipped = run_within_budget(
            [0, 1, 2], run, lambda item, message: {"item": item, "note": message}, label=str, progress=False
        )
        assert rows == [{"item": 0}, {"item": 1, "note": "out of memory"}, {"item": 2}]
        assert skipped == []
        rows, skipped = run_within_budget([0, 1], run, None, label=str, time_budget=0.0, progress=False)
        assert rows == [] and skipped == [0, 1]

    def test_table_aligns_columns(self):
        rows = [
            {"config": "mpa", "ms": 1.23456, "error": math.nan},
            {"config": "eigh-autograd", "ms": 1234.5},
        ]
        lines = format_table(rows, ["config", "ms", "error"]).splitlines()
        assert lines == [
            "config           ms  error",
            "mpa            1.23      -",
            "eigh-autograd  1234      -",
        ]


def test_smoke_run_writes_csv_json_png_and_prints_the_table(tmp_path, capsys):
    square_root_only = ["matrix_sqrth"] if HAS_MATRIX_SQRTH else []
    configs = ["mpa", "eigh", "ns3", *square_root_only]
    main(
        ["--sizes", "32", "--batches", "4", "--devices", "cpu", "--configs", *configs, "--repeats", "1",
         "--time-budget", "1", "--out", str(tmp_path), "--no-progress"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    payload = json.loads((tmp_path / "roots.json").read_text())
    with (tmp_path / "roots.csv").open() as file:
        csv_rows = list(csv.DictReader(file))
    rows, skipped = payload["rows"], payload["skipped"]
    assert len(rows) >= 1 and len(rows) + len(skipped) == 6 + len(square_root_only)  # sqrtm + inv_sqrtm cells
    assert [row["config"] for row in csv_rows] == [row["config"] for row in rows]
    assert payload["unsupported"] == [f"{name} inv_sqrtm cpu float32 n=32 b=4" for name in square_root_only]
    assert (
        rows[0]["config"] == "mpa" and rows[0]["forward_error"] < 1e-4 and rows[0]["forward_backward_ms"] > 0
    )
    assert (tmp_path / "pareto_cpu_float32_n32.png").stat().st_size > 10_000
    header = printed.splitlines()[0].split()
    assert header[:6] == ["config", "function", "device", "dtype", "n", "batch"]
    assert "gradient_error" in header and "peak_mib" not in header
    assert all(f"{name} (square root only)" in printed for name in square_root_only)
    assert (len(skipped) > 0) == ("time budget of 1 s spent" in printed)


def test_layer_run_measures_one_layer(tmp_path):
    rows, skipped = run_layers(
        layers=["ZCABatchNorm2d-g64"], methods=["eigh"], devices=["cpu"], dtypes=["float32"], warmup=0,
        repeats=1, progress=False,
    )  # fmt: skip
    assert skipped == [] and len(rows) == 1
    row = rows[0]
    assert (row["layer"], row["method"], row["input"], row["note"]) == (
        "ZCABatchNorm2d-g64",
        "eigh",
        "32x64x32x32",
        "",
    )
    # The whitened rows (N·H·W × C float32) alone are 8 MiB, and autograd must keep them for the affine.
    assert row["forward_backward_ms"] > 0 and row["saved_mib"] >= 8.0


def test_rounding_run_shows_each_backward_where_it_is_the_accurate_one(tmp_path, capsys):
    main(["--rounding", "--no-heads", "--sizes", "32", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "rounding.json").read_text())["rows"]
    assert len(rows) == 8  # two sample counts × four ridges
    assert "largest lyapunov / (u kappa)" in capsys.readouterr().out
    by_case = {(row["samples"], row["eps"]): row for row in rows}
    # Rank-deficient (8 positions) with a small ridge: the Lyapunov gradient is off by about the model's
    # figure, the unrolled one (the default there) is not.
    deficient = by_case[(8, 1e-5)]
    assert deficient["default"] == "adjoint"
    assert deficient["unrolled_range"] < 1e-3 < deficient["lyapunov_range"] <= deficient["model"]
    # Rounding grows with κ: below 1e5 the Lyapunov gradient meets tol and stays the default.
    assert all(
        row["lyapunov_range"] < 1e-3 and row["default"] == "lyapunov" for row in rows if row["eps"] >= 1e-3
    )


def test_input_rounding_stays_within_the_traces_room():
    from covpool.bench.rounding import INPUT_SIZES, input_rounding_rows
    from covpool.linalg.options import TRACE_ROUNDING

    rows = input_rounding_rows(batch=4)
    assert len(rows) == len(INPUT_SIZES) * 4
    # Rank-deficient inputs (8 positions) sit on the bound, so rounding puts some of them below it.
    assert max(row["below_bound_in_u"] for row in rows) > 0.0
    assert all(row["below_bound_in_u"] <= TRACE_ROUNDING for row in rows)
