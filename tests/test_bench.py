"""Tests of `python -m covpool.bench`: its pieces on reference values, and a tiny smoke run (the studies of
``examples/studies`` are run as scripts by ``tests/test_studies.py``).

The timing, budget and ranking logic is tested with fake clocks and made-up spreads, so those tests time
nothing and do not depend on the machine's load.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from covpool.bench.__main__ import main
from covpool.bench.budget import run_groups_within_budget, run_within_budget
from covpool.bench.configs import CONFIGS
from covpool.bench.grid import Cell, accuracy, auto_twins, plan_grid, run_comparison, run_grid
from covpool.bench.layers import run_layers
from covpool.bench.plot import pareto_front, plot_pareto
from covpool.bench.ranking import MAX_SPREAD, rank, rank_rows
from covpool.bench.report import format_comparisons, format_table
from covpool.bench.timing import Spread, measure, measure_interleaved, saved_tensor_bytes, time_interleaved
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


class FakeClock:
    """A clock that advances by the next of ``durations`` (seconds) at every second reading, i.e. each
    timed run takes the next duration; ``ticks`` counts the readings."""

    def __init__(self, durations=()):
        self.now, self.durations, self.ticks = 0.0, list(durations), 0

    def __call__(self) -> float:
        self.ticks += 1
        if self.ticks % 2 == 0 and self.durations:
            self.now += self.durations.pop(0)
        return self.now


CPU = torch.device("cpu")


class TestInterleaving:
    def test_rounds_visit_every_step_and_rotate_the_order(self):
        calls = []
        steps = {key: (lambda key=key: calls.append(key)) for key in "abc"}
        times, failures = time_interleaved(steps, device=CPU, warmup=1, repeats=4, timer=FakeClock())
        assert calls == list("abc" + "abc" + "bca" + "cab" + "abc")  # warmup, then rounds rotated by one
        assert failures == {} and all(len(samples) == 4 for samples in times.values())

    def test_a_failing_step_leaves_the_rotation_and_keeps_its_message(self):
        calls = []

        def fails() -> None:
            calls.append("bad")
            if calls.count("bad") == 2:
                raise RuntimeError("out of memory\ndetails")

        steps = {"good": lambda: calls.append("good"), "bad": fails}
        times, failures = time_interleaved(steps, device=CPU, warmup=0, repeats=3, timer=FakeClock())
        assert failures == {"bad": "out of memory"}
        assert calls == ["good", "bad", "bad", "good", "good"]
        assert len(times["good"]) == 3 and len(times["bad"]) == 1

    def test_measurements_keep_min_median_max_of_the_interleaved_runs(self):
        x = torch.randn(3, 4, requires_grad=True)
        cases = {"exp": (lambda: x.exp(), [x]), "sin": (lambda: x.sin(), [x])}
        # Steps: exp forward (ef), exp forward+backward (eb), sin forward (sf), sin fb (sb); round r starts
        # r steps later: ef eb sf sb | eb sf sb ef | sf sb ef eb. Each run takes the next duration.
        durations = [1, 10, 2, 20] + [12, 3, 21, 2] + [5, 22, 1, 11]
        measurements, failures = measure_interleaved(
            cases, device=CPU, warmup=0, repeats=3, timer=FakeClock([d / 1e3 for d in durations])
        )
        assert failures == {}

        def spread(s: Spread) -> list[float]:
            return pytest.approx([s.min, s.median, s.max])

        exp, sin = measurements["exp"], measurements["sin"]
        assert [1, 1, 2] == spread(exp.forward) and [10, 11, 12] == spread(exp.forward_backward)
        assert [2, 3, 5] == spread(sin.forward) and [20, 21, 22] == spread(sin.forward_backward)
        assert exp.forward_ms == pytest.approx(1.0) and sin.forward.ratio == pytest.approx(2.5)
        assert exp.saved_bytes == x.numel() * 4

    def test_a_failing_case_is_reported_and_the_others_measured(self):
        x = torch.randn(3, requires_grad=True)

        def broken() -> torch.Tensor:
            raise RuntimeError("linalg.eigh: failed to converge")

        measurements, failures = measure_interleaved(
            {"ok": (lambda: x.exp(), [x]), "broken": (broken, [x])}, device=CPU, warmup=0, repeats=2,
            timer=FakeClock([1e-3] * 4),
        )  # fmt: skip
        assert list(measurements) == ["ok"] and failures == {"broken": "linalg.eigh: failed to converge"}


class TestRanking:
    tight = Spread(1.0, 1.1, 1.2)

    def test_ranks_count_the_configurations_faster_in_every_run(self):
        a, b, c = Spread(1.0, 1.1, 1.2), Spread(1.15, 1.2, 1.3), Spread(2.0, 2.1, 2.2)
        verdict = rank({"a": (a, a), "b": (a, b), "c": (a, c)})
        # a and b overlap (1.15 < 1.2): not ordered; both are certainly faster than c.
        assert verdict.rankable and verdict.ranks == {"a": 1, "b": 1, "c": 3}

    def test_a_spread_wider_than_the_limit_forbids_ranking(self):
        wide = Spread(1.0, 1.2, 1.6)
        verdict = rank({"a": (self.tight, self.tight), "b": (wide, self.tight)})
        assert not verdict.rankable and verdict.ranks == {}
        assert verdict.reason == "spread above 1.5x: b 1.60x" and verdict.widest == pytest.approx(1.6)
        assert rank({"a": (self.tight, Spread(1.0, 1.2, MAX_SPREAD))}).rankable  # the limit itself is allowed

    def test_a_forward_slower_than_its_forward_backward_forbids_ranking(self):
        # The "eigh forward 286 ms but forward+backward 103 ms".
        verdict = rank({"eigh": (Spread(280.0, 286.0, 290.0), Spread(100.0, 103.0, 106.0))})
        assert not verdict.rankable and "slower than forward+backward" in verdict.reason

    def test_auto_must_take_the_time_of_the_method_it_runs(self):
        # The "auto, which is eigh on CPU, plotted 3.6x slower than eigh".
        slow = Spread(3.5, 3.6, 3.7)
        verdict = rank({"auto": (self.tight, slow), "eigh": (self.tight, self.tight)}, same={"auto": "eigh"})
        assert (
            not verdict.rankable
            and verdict.reason == "auto runs eigh but took 3.27x its forward+backward time"
        )
        close = Spread(1.05, 1.15, 1.2)
        assert rank({"auto": (close, close), "eigh": (close, close)}, same={"auto": "eigh"}).rankable

    def test_rank_rows_marks_rows_and_lists_the_missing(self):
        def row(config, runs, low, mid, high):
            return {"config": config, "runs": runs, "n": 8, "forward_ms": mid, "forward_min_ms": low,
                    "forward_max_ms": high, "forward_backward_ms": 2 * mid,
                    "forward_backward_min_ms": 2 * low, "forward_backward_max_ms": 2 * high}  # fmt: skip

        rows = [row("auto", "eigh", 1.0, 1.1, 1.2), row("eigh", "eigh", 1.0, 1.1, 1.2)]
        rows += [row("ns3", "ns", 3.0, 3.1, 3.2), row("mpa", "mpa", math.nan, math.nan, math.nan)]
        verdict = rank_rows(rows, ["n"], same={"auto": "eigh", "mpa": "eigh"})  # mpa was not timed
        assert verdict == {"n": 8, "rankable": True, "reason": "", "widest_spread": pytest.approx(1.2),
                           "missing": ["mpa"], "same": {"auto": "eigh"}}  # fmt: skip
        assert [r["rank"] for r in rows] == [1, 1, 3, None]
        assert rows[0]["spread"] == pytest.approx(1.2) and math.isnan(rows[3]["spread"])


class TestNothingDropped:
    def test_the_budget_is_soft_and_lists_every_cell_it_left_out(self):
        clock = FakeClock()
        clock.durations = []

        def run_group(group):
            clock.now += 10.0  # every group takes 10 s
            return [{"cell": cell, "forward_ms": 1.0, "note": ""} for cell in group]

        result = run_groups_within_budget(
            [["a1", "a2"], ["b1"], ["c1", "c2"]], run_group,
            lambda cell, why: {"cell": cell, "forward_ms": math.nan, "note": why},
            label=str, time_budget=5.0, progress=False, timer=clock,
        )  # fmt: skip
        # The first group starts within the budget and finishes past it (soft); no later group starts.
        assert [row["cell"] for row in result.rows] == ["a1", "a2", "b1", "c1", "c2"]
        reason = "not run: time budget of 5 s spent (10 s elapsed)"
        assert result.missing == [("b1", reason), ("c1", reason), ("c2", reason)]
        assert result.elapsed_s == 10.0

    def test_a_group_that_fails_as_a_whole_gets_rows_and_is_listed(self):
        def run_group(group):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")

        result = run_groups_within_budget(
            [["a"]], run_group, lambda cell, why: {"cell": cell, "note": why}, label=str, progress=False
        )
        assert result.rows == [{"cell": "a", "note": "failed: CUDA out of memory. Tried to allocate 2 GiB"}]
        assert result.missing == [("a", "failed: CUDA out of memory. Tried to allocate 2 GiB")]

    def test_run_comparison_reports_auto_as_what_it_runs(self):
        cells = [Cell(config, "sqrtm", "cpu", "float64", 8, 2) for config in ("auto", "eigh", "ns3")]
        A = random_spd(2, n=8, dtype=torch.float64)
        rows = run_comparison(cells, A, A, warmup=0, repeats=2, timer=FakeClock([1e-3] * 12))
        assert [(row["config"], row["runs"]) for row in rows] == [
            ("auto", "eigh"),
            ("eigh", "eigh"),
            ("ns3", "ns"),
        ]
        assert all(
            row[key] == pytest.approx(1.0)
            for row in rows
            for key in ("forward_ms", "forward_backward_max_ms")
        )
        assert rows[0]["forward_error"] == rows[1]["forward_error"]
        # Only auto is checked against what it runs: paper runs mpa, but with other settings.
        paper = [{"config": "paper", "runs": "mpa"}, {"config": "mpa", "runs": "mpa"}]
        assert auto_twins(rows) == {"auto": "eigh"} and auto_twins(paper) == {}

    def test_a_spent_budget_leaves_rows_table_lines_and_panels_for_every_cell(self, tmp_path):
        cells, _ = plan_grid(configs=["auto", "eigh"], functions=["sqrtm", "inv_sqrtm"], devices=["cpu"],
                             dtypes=["float32"], sizes=[16], batches=[1, 2])  # fmt: skip
        result = run_grid(cells, time_budget=0.0, progress=False)
        assert len(result.rows) == len(cells) == 8 and len(result.missing) == 8
        assert all(row["note"].startswith("not run: time budget of 0 s spent") for row in result.rows)
        assert [v["rankable"] for v in result.comparisons] == [False] * 4
        labels = [f"comparison {i}" for i in range(4)]
        table = format_comparisons(result.rows, result.comparisons, ["config", "note"], labels)
        assert table.count("NOT RUN") == 4 and len(table.splitlines()) == 1 + 4 + 8
        (path,) = plot_pareto(result.rows, result.comparisons, tmp_path)
        assert path.name == "pareto_cpu_float32_n16.png" and path.stat().st_size > 10_000


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
    rows, missing = payload["rows"], payload["missing"]
    assert len(rows) == 6 + len(square_root_only)  # sqrtm + inv_sqrtm cells, measured or not
    assert [m["cell"] for m in missing] == [
        f"{row['config']} {row['function']} cpu float32 n=32 b=4" for row in rows if row["forward_ms"] is None
    ]
    assert [row["config"] for row in csv_rows] == [row["config"] for row in rows]
    assert payload["unsupported"] == [f"{name} inv_sqrtm cpu float32 n=32 b=4" for name in square_root_only]
    assert (
        rows[0]["config"] == "mpa" and rows[0]["forward_error"] < 1e-4 and rows[0]["forward_backward_ms"] > 0
    )
    assert (tmp_path / "pareto_cpu_float32_n32.png").stat().st_size > 10_000
    lines = printed.splitlines()
    assert lines[0].split()[:2] == ["config", "runs"] and "forward+backward ms" in lines[0]
    assert "gradient_error" in lines[0] and "peak_mib" not in lines[0]
    assert lines[1].startswith("== sqrtm cpu float32 n=32 batch=4: ")
    assert all(f"{name} (square root only)" in printed for name in square_root_only)
    assert (len(missing) > 0) == ("MISSING:" in printed)
    assert "time budget 1 s (soft)" in printed


def test_layer_run_measures_one_layer(tmp_path):
    result, verdicts = run_layers(
        layers=["ZCABatchNorm2d-g64"], methods=["auto", "eigh"], devices=["cpu"], dtypes=["float32"],
        warmup=0, repeats=1, progress=False,
    )  # fmt: skip
    assert result.missing == [] and len(result.rows) == 2 and len(verdicts) == 1
    row = result.rows[1]
    assert (row["layer"], row["method"], row["runs"], row["input"], row["note"]) == (
        "ZCABatchNorm2d-g64",
        "eigh",
        "eigh",
        "32x64x32x32",
        "",
    )
    assert result.rows[0]["runs"] == "eigh"  # auto on CPU
    # The whitened rows (N·H·W × C float32) alone are 8 MiB, and autograd must keep them for the affine.
    assert row["forward_backward_ms"] > 0 and row["saved_mib"] >= 8.0


def test_the_reports_product_floor_counts_each_product_in_its_precision():
    from covpool.bench.cuda_report import product_floor

    times = {"float32": 0.05, "tf32": 0.02, "bf16": 0.01}
    assert product_floor(50, 0, times) == pytest.approx(2.5)
    assert product_floor(119, 102, times) == pytest.approx(102 * 0.02 + 17 * 0.05)


def test_the_reports_training_step_learns_under_autocast():
    """``cuda_report``'s step (section 5 and the ResNet-50 comparison), on CPU with bfloat16 autocast."""
    from covpool.bench.cuda_report import sgd_step

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x, y = torch.randn(6, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    step = sgd_step(net, x, y, autocast=torch.bfloat16)
    losses = [step().item() for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    assert net[1].weight.grad is not None and net[1].weight.dtype == torch.float32


@pytest.mark.skipif(
    torch.torch_version.TorchVersion(torch.__version__) < "2.12",
    reason="dynamo before torch 2.12 cannot compile the roots (tests/test_linalg_roots.py says why)",
)
def test_compile_run_reports_one_frame_one_graph_and_no_break(tmp_path, capsys):
    # Dynamo alone (the eager backend): the counts, not the times, are what this checks.
    main(["--compile", "--compile-backend", "eager", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "compile.json").read_text())["report"]
    assert (report["frames"], report["graphs"], report["graph_breaks"]) == (1, 1, 0)
    assert report["break_reasons"] == []
    assert "frames 1, graphs 1, graph breaks 0" in capsys.readouterr().out


def test_host_rows_count_each_methods_operators():
    from covpool.bench.host import HOST_METHODS, host_rows

    rows = host_rows(sizes=(4,), batch=2, calls=5)
    assert [row["method"] for row in rows] == list(HOST_METHODS)
    for row in rows:
        # The backward dispatches operators of its own; every figure is a measured, positive time.
        assert 0 < row["forward_ops"] < row["forward_backward_ops"]
        assert min(row["forward_us"], row["forward_backward_us"], row["options_plan_us"]) > 0


@pytest.mark.parametrize("flag", ["--rounding", "--mixed", "--tf32-fit", "--beyond"])
def test_the_studies_are_not_flags_of_the_package(flag, capsys):
    """They are scripts of the repository (``examples/studies``), run by ``tests/test_studies.py``."""
    with pytest.raises(SystemExit) as exit_info:
        main([flag])
    assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_help_names_the_console_script(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    printed = capsys.readouterr().out
    assert exit_info.value.code == 0 and printed.startswith("usage: covpool-bench ")
    assert "python -m covpool.bench [" not in printed
