"""covpool-train (LightningCLI): help, a fast_dev_run from a shipped config, num_classes linking."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import covpool

from lightning_modules import CovarianceSpectrumMonitor, DigitsDataModule, ImageFolderDataModule
from lightning_modules.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_modules" / "configs"


@pytest.fixture(autouse=True)
def clean_argv(monkeypatch):
    """LightningCLI warns when ``args`` is given while sys.argv holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["covpool-train"])


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "fit" in capsys.readouterr().out


def test_fit_fast_dev_run_from_config(tmp_path):
    cli = main(
        [
            "fit",
            "--config",
            str(CONFIGS / "digits_resnet18_isqrtcov.yaml"),
            "--trainer.fast_dev_run=true",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--data.init_args.image_size=32",
            "--model.model_kwargs={reduction_dim: 8, output_stride: 16}",
        ]
    )
    assert cli.trainer.global_step == 1
    assert isinstance(cli.datamodule, DigitsDataModule) and cli.model.hparams.num_classes == 10
    assert cli.model.model.head.root == covpool.RootOptions(method="auto", tol=1e-3)
    assert any(isinstance(c, CovarianceSpectrumMonitor) for c in cli.trainer.callbacks)
    assert any(k.startswith("spectrum/") for k in cli.trainer.callback_metrics)


def test_root_options_from_the_command_line_reach_every_layer(tmp_path):
    cli = main(
        [
            "--model.model=resnet18",
            "--model.head=isqrtcov",
            "--model.zca=first",
            "--model.matrix_root={method: mtp, tol: 0.0001}",
            "--model.head_kwargs={reduction_dim: 8}",
        ],
        run=False,
    )
    expected = covpool.RootOptions(method="mtp", tol=1e-4)
    roots = [m.root for m in cli.model.modules() if hasattr(m, "root") and isinstance(m, torch.nn.Module)]
    assert len(roots) == 2 and all(root == expected for root in roots)


def test_unused_root_options_are_refused_at_construction():
    with pytest.raises(ValueError, match="steps is not used by method='eigh'"):
        main(["--model.matrix_root={method: eigh, steps: 3}"], run=False)


def test_num_classes_comes_from_the_data(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    cli = main(
        [
            "--data=lightning_modules.ImageFolderDataModule",
            f"--data.root={tmp_path}",
            "--model.model=test_resnet",
        ],
        run=False,
    )
    assert isinstance(cli.datamodule, ImageFolderDataModule)
    assert cli.model.hparams.num_classes == 3 and cli.model.model.num_classes == 3


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_parse(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    assert "class_path" in capsys.readouterr().out
