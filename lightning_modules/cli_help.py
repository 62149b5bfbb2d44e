"""What ``covpool-train --help`` says, importable without Lightning: the description, a one-sentence help
per subcommand, the shipped configs and the examples.

:mod:`lightning_modules.cli` prints the top-level help from here without building the parser (which
imports Lightning, timm and the model); :mod:`lightning_modules.training_cli` gives the same texts to
the parser, so ``covpool-train fit --help`` and the subcommand list read alike.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The shipped configurations (package data, so installed with the package)."""

DESCRIPTION = """\
Train or fine-tune an image classifier with covpool's second-order layers: a timm model (ResNet, ViT,
... by name) whose pooling and classifier become a covariance-pooling head (--model.head isqrtcov:
iSQRT-COV; sovit: So-ViT's token head) and whose BatchNorms can become group ZCA whitening (--model.zca
first|all), with the matrix root options in --model.matrix_root. Data: the digits bundled with
scikit-learn (default, no download), CIFAR-10 (--data lightning_modules.CIFARDataModule) or a folder of
images (--data lightning_modules.ImageFolderDataModule). It is Lightning's CLI for CovPoolClassifier:
subcommands fit, validate, test, predict, and every option a flag or a key of a YAML config."""

SUBCOMMAND_HELP: dict[str, str] = {
    "fit": "Train the model, validating it on the validation split as the trainer's options say.",
    "validate": "Run one evaluation epoch on the validation split and print its metrics.",
    "test": "Run one evaluation epoch on the test split and print its metrics.",
    "predict": "Run the model on the predict split and return its predictions.",
}
"""One sentence per subcommand of Lightning's CLI (Lightning's own are the first line of the Trainer
method's docstring, which for ``test`` and ``predict`` ends mid-sentence)."""


def _config_summary(path: Path) -> str:
    """The first comment line of a shipped config: what it trains."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def help_epilog() -> str:
    """The end of ``covpool-train --help``: the shipped configs with what each trains, and examples."""
    configs = sorted(CONFIG_DIR.glob("*.yaml"))
    width = max(len(path.name) for path in configs)
    lines = [f"shipped configs (in {CONFIG_DIR}):"]
    lines += [f"  {path.name:{width}s}  {_config_summary(path)}" for path in configs]
    example = CONFIG_DIR / "digits_resnet18_isqrtcov.yaml"
    lines += [
        "",
        "examples:",
        f"  covpool-train fit --config {example}",
        "  covpool-train fit --config CONFIG --trainer.max_epochs 2 --model.matrix_root mtp",
        "  covpool-train fit --model.model resnet18 --model.head isqrtcov --model.zca first",
        "  covpool-train fit --help   (every option of the model, the data and the trainer)",
        "  covpool-train fit --config CONFIG --print_config   (the resolved configuration)",
    ]
    return "\n".join(lines)


def top_level_help() -> str:
    """``covpool-train --help``: usage, description, the options of the top level, the subcommands with
    :data:`SUBCOMMAND_HELP`, then :func:`help_epilog`."""
    names = ",".join(SUBCOMMAND_HELP)
    width = max(len(name) for name in SUBCOMMAND_HELP)
    lines = [
        f"usage: covpool-train [-h] [-c CONFIG] [--print_config[=flags]] {{{names}}} ...",
        "",
        DESCRIPTION,
        "",
        "options:",
        "  -h, --help            show this help message and exit",
        "  -c CONFIG, --config CONFIG",
        "                        a configuration file in YAML or JSON (the shipped ones below)",
        "  --print_config[=flags]",
        "                        print the resolved configuration and exit (flags: skip_default,",
        "                        skip_unset)",
        "",
        "subcommands (each takes --help for its options: the model's, the data's and the trainer's):",
        *(f"  {name:{width}s}  {text}" for name, text in SUBCOMMAND_HELP.items()),
        "",
        help_epilog(),
    ]
    return "\n".join(lines)
