"""``covpool-train``: LightningCLI for :class:`CovPoolClassifier` on any of the data modules.

Examples::

    covpool-train fit --config lightning_modules/configs/digits_resnet18_isqrtcov.yaml
    covpool-train fit --data lightning_modules.CIFARDataModule --data.root data --model.model resnet18
    covpool-train --help

The data module defaults to :class:`DigitsDataModule`; ``num_classes`` of the model is taken from the
data module.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_modules.classifier import CovPoolClassifier
from lightning_modules.data import ClassificationDataModule


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
    return CovPoolCLI(
        CovPoolClassifier,
        ClassificationDataModule,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def main(args: list[str] | None = None) -> None:
    """Console entry point ``covpool-train``: returns nothing, so the process exits with status 0.

    The console script calls ``sys.exit(main())``: a returned object would be printed and exit with
    status 1. Errors propagate (status 1), and bad arguments exit with jsonargparse's status 2.
    """
    create_cli(args)


if __name__ == "__main__":
    sys.exit(main())
