"""The example scripts: ``--help`` and a ``--fast-dev-run`` of each, in process through ``main(argv)``."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

import covpool
from covpool import CovPoolHead, SecondOrderTokenHead, ZCABatchNorm2d
from covpool.bench.timing import upstream_gradient
from covpool.models import CovPooledModel, SoViT
from covpool.testing import reference_gradient, reference_root, relative_error

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = ("zca_resnet_cifar", "sovit_vit", "finetune_imagefolder", "zca_recalibration")


@pytest.fixture
def load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Import an example script as a module, run from ``tmp_path`` so nothing lands in the checkout."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.chdir(tmp_path)

    def _load(name: str) -> ModuleType:
        return importlib.import_module(name)

    return _load


def common_args(tmp_path: Path) -> list[str]:
    return ["--fast-dev-run", "--accelerator", "cpu", "--devices", "1", "--output-dir", str(tmp_path)]


def assert_tested(trainer) -> None:
    metrics = trainer.callback_metrics
    assert {"test/loss", "test/acc1"} <= set(metrics)
    assert math.isfinite(float(metrics["test/loss"]))


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(load, capsys: pytest.CaptureFixture, name: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load(name).main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--fast-dev-run" in out and "python examples/" in out


def test_zca_resnet_cifar(load, tmp_path: Path) -> None:
    script = load("zca_resnet_cifar")
    argv = ["--synthetic", "--batch-size", "8", "--num-workers", "0", *common_args(tmp_path)]
    with pytest.warns(UserWarning, match="GENERATED data"):
        trainer = script.main(argv)
    net = trainer.lightning_module.model
    assert isinstance(net.bn1, ZCABatchNorm2d)
    assert type(net.layer1[0].bn1) is nn.BatchNorm2d  # only the first BatchNorm is converted
    assert_tested(trainer)


def test_cifar_resnet_stem(load) -> None:
    script = load("zca_resnet_cifar")
    net = script.cifar_resnet("resnet18", 10)
    assert net.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 512, 4, 4)
    with pytest.raises(ValueError, match="single-convolution stem"):
        script.cifar_resnet("resnet18d", 10)


def test_sovit_vit(load, tmp_path: Path) -> None:
    script = load("sovit_vit")
    trainer = script.main(
        ["--depth", "1", "--reduction-dim", "8", "--batch-size", "16", *common_args(tmp_path)]
    )
    net = trainer.lightning_module.model
    assert isinstance(net, SoViT) and net.patch_embed.num_patches == 64
    assert_tested(trainer)


def test_zca_recalibration(load, tmp_path: Path) -> None:
    script = load("zca_recalibration")
    results = script.main(["--model", "test_resnet", "--group-size", "4", *common_args(tmp_path)])
    expected = {"eval, running statistics", "eval, ZCA recalibrated", "train mode (batch statistics)"}
    assert expected <= set(results)
    assert results["lag_after"] < results["lag_before"]


def test_finetune_imagefolder(load, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    weights = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), weights)

    script = load("finetune_imagefolder")
    argv = [str(root), "--weights", str(weights), "--reduction-dim", "8", "--image-size", "64"]
    trainer = script.main([*argv, "--batch-size", "4", "--num-workers", "0", *common_args(tmp_path)])
    net = trainer.lightning_module.model
    assert isinstance(net, CovPooledModel) and net.get_classifier().out_features == 2
    assert_tested(trainer)


# The paper-comparison scripts: ``--help``, their pieces, and a ``--quick`` run of each (a few seconds).

PAPER_SCRIPTS = ("paper_numerics", "paper_dbn", "paper_heads")


@pytest.fixture(autouse=True)
def _restore_threads():
    """The paper scripts' ``--threads`` sets torch's thread count for the process: restore it afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def quick_args(tmp_path: Path) -> list[str]:
    # One thread: these runs are made of tiny operations, which two threads on a busy machine slow down ~10x.
    return ["--quick", "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress", "--threads", "1"]


@pytest.mark.parametrize("name", PAPER_SCRIPTS)
def test_paper_help(load, capsys: pytest.CaptureFixture, name: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load(name).main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--device" in out and f"python examples/{name}.py" in out


def ns_error(A: torch.Tensor, G: torch.Tensor, steps: int, *, inverse: bool) -> float:
    """Largest relative forward or gradient error of ``steps`` Newton-Schulz steps against float64 eigh."""
    X = A.clone().requires_grad_()
    out = (covpool.inv_sqrtm if inverse else covpool.sqrtm)(X, method="ns", steps=steps)
    (grad,) = torch.autograd.grad(out, X, G)
    forward = relative_error(out.detach(), reference_root(A, inverse=inverse)).max()
    return max(forward, relative_error(grad, reference_gradient(A, G, inverse=inverse)).max()).item()


class TestPaperNumerics:
    def test_fewest_steps_finds_the_first_count_meeting_the_tolerance(self, load) -> None:
        fewest_steps = load("paper_numerics").fewest_steps
        calls: list[int] = []

        def error(steps: int) -> float:
            calls.append(steps)
            return 2.0**-steps

        # 2^-10 < 1e-3 < 2^-9: 10 steps from any start at or below 10, in about 2 log2(10 - start) calls.
        for start in range(1, 11):
            calls.clear()
            assert fewest_steps(error, start=start, tol=1e-3, cap=40) == (10, True)
            assert len(calls) <= 2 * math.log2(11 - start) + 2
        assert fewest_steps(error, start=1, tol=1e-3, cap=8) == (8, False)

    def test_quick_run(self, load, tmp_path: Path) -> None:
        script = load("paper_numerics")
        result = script.main(quick_args(tmp_path))
        out = tmp_path / "out"
        names = ["errors.csv", "times.csv", "forward_error.png", "gradient_error.png", "time_vs_n.png"]
        for name in [*names, "time_vs_batch.png"]:
            assert (out / f"numerics_cpu_{name}").stat().st_size > 0
        assert json.loads((out / "numerics_cpu.json").read_text())["skipped"] == []
        errors, times = result["errors"], result["times"]
        configs = script.configurations(script.QUICK["tols"])
        # every configuration x 2 functions x 2 sizes x 2 dtypes x 2 conditions, none failed
        assert len(errors) == len(configs) * 2 * 2 * 2 * 2 and not any(row["note"] for row in errors)
        assert all(row["forward_backward_ms"] > 0 for row in times) and not any(row["note"] for row in times)
        for row in errors:
            if row["config"] == "eigh":  # exact: round-off of the dtype against the float64 references
                assert row["gradient_error"] < (1e-12 if row["dtype"] == "float64" else 1e-4)
            if row["config"] == "ns5" and row["condition"] == 1e3:  # 5 steps do not resolve 1e-3
                assert row["gradient_error"] > 0.1

    def test_matched_steps_are_the_fewest_meeting_the_tolerance(self, load, tmp_path: Path) -> None:
        script = load("paper_numerics")
        result = script.main([*quick_args(tmp_path), "--dtypes", "float32"])
        matched = [row for row in result["errors"] if row["config"] == script.MATCHED]
        assert len(matched) == 8  # 2 functions x 2 sizes x 2 conditions
        for row in matched:
            # recomputed on the script's matrices: `steps` meets the tolerance, one step fewer does not
            A = script.spd(2, row["n"], row["condition"], "float32", torch.device("cpu"), seed=1)
            G = upstream_gradient(A, seed=2)
            inverse = row["function"] == "inv_sqrtm"
            assert ns_error(A, G, row["steps"], inverse=inverse) <= 1e-3
            assert ns_error(A, G, row["steps"] - 1, inverse=inverse) > 1e-3

    def test_time_condition_must_be_a_measured_condition(self, load) -> None:
        with pytest.raises(SystemExit):
            load("paper_numerics").parse_args(["--conditions", "10", "--time-condition", "1000"])


class TestPaperTraining:
    def test_training_repeats_exactly_with_its_seed(self, load) -> None:
        training = load("digits_training")
        data = training.load_digits(image_size=8, device=torch.device("cpu"))
        settings = training.TrainSettings(steps=3, eval_every=3, batch_size=32)

        def losses(seed: int) -> list[float]:
            torch.manual_seed(seed)
            return training.train(training.SmallResNet(widths=(4, 8, 8)), data, settings, seed=seed)["loss"]

        assert losses(0) == losses(0) != losses(1)

    def test_dbn_models_whiten_only_the_first_batchnorm(self, load) -> None:
        script = load("paper_dbn")
        args = script.parse_args([])
        for variant, root in script.ZCA_VARIANTS.items():
            net = script.build_model(variant, args)
            norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d | ZCABatchNorm2d)]
            if root is None:
                assert all(type(m) is nn.BatchNorm2d for m in norms)
                continue
            assert isinstance(net.bn1, ZCABatchNorm2d) and net.bn1 is norms[0]
            assert net.bn1.root.method == root["method"] and net.bn1.group_size == args.group_size
            assert all(type(m) is nn.BatchNorm2d for m in norms[1:])

    def test_dbn_quick_run(self, load, tmp_path: Path) -> None:
        script = load("paper_dbn")
        result = script.main(quick_args(tmp_path))
        for name in ("runs.csv", "summary.csv", "curves.png"):
            assert (tmp_path / "out" / f"dbn_cpu_{name}").stat().st_size > 0
        runs = result["runs"]
        assert sorted((run["variant"], run["seed"]) for run in runs) == sorted(
            (variant, seed) for variant in script.ZCA_VARIANTS for seed in (0, 1)
        )
        assert not any(run["note"] for run in runs)
        for row in result["summary"]:
            errors = [run["test_error_pct"] for run in runs if run["variant"] == row["variant"]]
            assert row["seeds"] == 2 and 0 <= row["test_error_pct"] <= 100
            assert row["test_error_std"] == pytest.approx(abs(errors[0] - errors[1]) / math.sqrt(2))

    def test_heads_models_and_positions(self, load) -> None:
        script = load("paper_heads")
        args = script.parse_args([])
        assert script.check_positions(args) == {"resnet": 8 * 8, "vit": 4 * 4}
        for variant in script.VARIANTS:
            net = script.builder(variant, args)()
            family, head, *root = variant.split("-")
            if head in ("isqrtcov", "sovit"):
                assert isinstance(net, CovPooledModel) and net.head.root.method == root[0]
                expected = CovPoolHead if head == "isqrtcov" else SecondOrderTokenHead
                assert type(net.head) is expected
            assert net(torch.zeros(2, 1, args.image_size, args.image_size)).shape == (2, 10)
        small = script.parse_args(["--image-size", "4", "--patch-size", "4"])
        with pytest.raises(ValueError, match="at least 2x2"):
            script.check_positions(small)

    def test_heads_quick_run(self, load, tmp_path: Path) -> None:
        script = load("paper_heads")
        result = script.main(quick_args(tmp_path))
        assert (tmp_path / "out" / "heads_cpu_curves.png").stat().st_size > 0
        assert [row["variant"] for row in result["summary"]] == list(script.DEFAULT_VARIANTS)
        assert all(row["seeds"] == 2 for row in result["summary"])
        assert min(result["settings"]["pooled_positions"].values()) >= 4
