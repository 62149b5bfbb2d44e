"""covpool-demo: --help, and a fast_dev_run that writes its figures and is reproducible."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lightning_modules.finetune_demo import MODELS, main


def test_help_says_what_runs_and_shows_every_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "Train ResNet-18" in printed and "Fine-tune" not in printed
    for flag, default in [("--seed", "0"), ("--batch-size", "64"), ("--lr", "0.05"), ("--max-epochs", "5")]:
        described = printed.split(f"{flag} {flag[2:].upper().replace('-', '_')}", 2)[-1]
        assert described.split("--")[0].rstrip().endswith(f"(default: {default})"), flag


def test_help_imports_neither_lightning_nor_torch():
    code = (
        "import sys\n"
        "from lightning_modules.finetune_demo import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as exit:\n    assert exit.code == 0\n"
        "print(sorted({'lightning', 'torch', 'timm'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_bad_epochs():
    with pytest.raises(SystemExit):
        main(["--max-epochs", "0"])


def test_fast_dev_run_writes_results_and_is_deterministic(tmp_path):
    common = ["--fast-dev-run", "2", "--image-size", "32", "--reduction-dim", "8", "--seed", "3"]
    main([*common, "--output-dir", str(tmp_path / "a")])
    main([*common, "--output-dir", str(tmp_path / "b")])
    first = json.loads((tmp_path / "a" / "results.json").read_text())
    second = json.loads((tmp_path / "b" / "results.json").read_text())
    assert (tmp_path / "a" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(first["models"]) == set(MODELS)
    assert first["torch_version"] == torch.__version__ and first["cpu"]
    for name, result in first["models"].items():
        assert result["steps"] == 2 and len(result["train_loss"]) == 2
        assert (
            0 <= result["val_acc1"] <= 1 and 0 <= result["test_acc1"] <= 1 and result["time_per_step_s"] > 0
        )
        assert result["train_loss"] == second["models"][name]["train_loss"]
        assert result["test_acc1"] == second["models"][name]["test_acc1"]
