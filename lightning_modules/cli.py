"""``covpool-train``: LightningCLI for :class:`CovPoolClassifier` on any of the data modules.

``covpool-train --help`` (and ``fit --help``) says what it trains, lists the shipped configs with
their installed path and gives example lines. Examples::

    covpool-train fit --config lightning_modules/configs/digits_resnet18_isqrtcov.yaml
    covpool-train fit --data lightning_modules.CIFARDataModule --data.root data --model.model resnet18
    covpool-train --help

The data module defaults to :class:`DigitsDataModule`; ``num_classes`` of the model is taken from the
data module.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_modules.classifier import CovPoolClassifier
from lightning_modules.data import ClassificationDataModule

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


class _HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's formatter, keeping the line breaks of the description and the epilog."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


class CovPoolCLI(LightningCLI):
    """LightningCLI that links the data module's ``num_classes`` into the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"data": {"class_path": "lightning_modules.DigitsDataModule"}})
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


def create_cli(args: list[str] | None = None, *, run: bool = True) -> CovPoolCLI:
    """Run the CLI on ``args`` (``sys.argv[1:]`` when ``None``); returns the CLI object.

    With ``run=False`` the arguments take no subcommand and the model, data module and trainer are only
    instantiated (``cli.model``, ``cli.datamodule``, ``cli.trainer``).
    """
    help_kwargs = {"description": DESCRIPTION, "epilog": help_epilog(), "formatter_class": _HelpFormatter}
    return CovPoolCLI(
        CovPoolClassifier,
        ClassificationDataModule,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={**help_kwargs, "fit": help_kwargs},
    )


def main(args: list[str] | None = None) -> None:
    """Console entry point ``covpool-train``: returns nothing, so the process exits with status 0.

    The console script calls ``sys.exit(main())``: a returned object would be printed and exit with
    status 1. Errors propagate (status 1), and bad arguments exit with jsonargparse's status 2.
    """
    create_cli(args)


if __name__ == "__main__":
    sys.exit(main())
