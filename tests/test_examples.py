"""The example scripts: ``--help`` and a ``--fast-dev-run`` of each, in process through ``main(argv)``."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from covpool import ZCABatchNorm2d
from covpool.models import CovPooledModel, SoViT

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = ("zca_resnet_cifar", "sovit_vit", "finetune_imagefolder")


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
