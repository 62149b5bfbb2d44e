"""covpool-train (LightningCLI): help, fast_dev_run from a config, num_classes linking, exit status."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import covpool
from lightning_modules import CovarianceSpectrumMonitor, DigitsDataModule, ImageFolderDataModule
from lightning_modules.cli import main
from lightning_modules.cli_help import SUBCOMMAND_HELP
from lightning_modules.training_cli import CovPoolCLI, create_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "lightning_modules" / "configs"


@pytest.fixture(autouse=True)
def clean_argv(monkeypatch):
    """LightningCLI warns when ``args`` is given while sys.argv holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["covpool-train"])


@pytest.mark.parametrize("args", [["--help"], ["fit", "--help"]])
def test_help_says_what_it_trains_lists_the_shipped_configs_and_gives_examples(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "Train or fine-tune an image classifier with covpool's second-order layers" in printed
    assert "Lightning Trainer command line tool" not in printed
    configs = sorted(CONFIGS.glob("*.yaml"))
    assert configs and f"shipped configs (in {CONFIGS.resolve()})" in printed
    assert all(path.name in printed for path in configs)
    assert "ResNet-18 with an iSQRT-COV head on the embedded digits" in printed  # the config's own comment
    assert f"covpool-train fit --config {CONFIGS.resolve() / 'digits_resnet18_isqrtcov.yaml'}" in printed


@pytest.mark.parametrize("subcommand", list(SUBCOMMAND_HELP))
def test_every_subcommand_has_its_whole_sentence_in_both_helps(subcommand, capsys):
    assert set(SUBCOMMAND_HELP) == set(CovPoolCLI.subcommands())
    sentence = SUBCOMMAND_HELP[subcommand]
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    assert sentence in listed and "usage: covpool-train" in listed
    with pytest.raises(SystemExit):
        create_cli(["--help"])  # the parser's own listing, which wraps lines
    assert " ".join(sentence.split()) in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main([subcommand, "--help"])
    own = capsys.readouterr().out
    assert own.startswith("usage: covpool-train")
    assert f"{subcommand}: {sentence.lower().rstrip('.')}" in " ".join(own.lower().split())  # its group
    assert "make sure you never run on your" not in own and "Useful to" not in own  # Lightning's cut text
    assert "Base class: holds" not in own


def test_top_level_help_imports_neither_lightning_nor_torch():
    code = (
        "import sys\n"
        "from lightning_modules.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as exit:\n    assert exit.code == 0\n"
        "print(sorted({'lightning', 'torch', 'timm'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert "shipped configs" in done.stdout


def test_fit_fast_dev_run_from_config(tmp_path):
    cli = create_cli(
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
    cli = create_cli(
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
        create_cli(["--model.matrix_root={method: eigh, steps: 3}"], run=False)


def test_num_classes_comes_from_the_data(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    cli = create_cli(
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


# What the installed ``covpool-train`` script runs (setuptools' wrapper), and ``python -m``.
CONSOLE_SCRIPT = ("-c", "import sys; from lightning_modules.cli import main; sys.exit(main())")
MODULE = ("-m", "lightning_modules.cli")


def run_cli(entry: tuple[str, str], *args: str) -> subprocess.CompletedProcess:
    """Run the CLI in a new process from the repository root, as a user would."""
    return subprocess.run(
        [sys.executable, *entry, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def test_entry_point_is_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["covpool-train"] == "lightning_modules.cli:main"


def test_exit_status_0_after_a_run_and_nonzero_on_failure(tmp_path):
    fit = [
        "fit",
        "--config",
        str(CONFIGS / "digits_resnet18_isqrtcov.yaml"),
        "--trainer.fast_dev_run=true",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks=[]",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.init_args.image_size=32",
        "--data.init_args.batch_size=8",
        "--model.model_kwargs={reduction_dim: 4, output_stride: 16}",
    ]
    for entry in (CONSOLE_SCRIPT, MODULE):
        done = run_cli(entry, *fit)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "CovPoolCLI" not in done.stdout + done.stderr  # the CLI object is not printed
    # 1 x 1 feature maps: the head raises at the first batch, the process exits with status 1
    failed = run_cli(MODULE, *fit, "--model.model_kwargs={reduction_dim: 4, output_stride: 32}")
    assert failed.returncode == 1 and "CovPoolHead needs" in failed.stderr
