"""The LightningCLI behind ``covpool-train`` (the entry point is :mod:`lightning_modules.cli`).

Building it imports Lightning, timm and the model: ``covpool-train --help`` is answered without it, every
other command line comes here. The texts of the help are :mod:`lightning_modules.cli_help`'s.
"""

from __future__ import annotations

from typing import Any

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_modules.classifier import CovPoolClassifier
from lightning_modules.cli_help import DESCRIPTION, SUBCOMMAND_HELP, help_epilog
from lightning_modules.data import ClassificationDataModule

DATA_TITLE = (
    "data: a ClassificationDataModule, DigitsDataModule unless --data names another (CIFARDataModule, "
    "ImageFolderDataModule or a class path of your own)"
)
"""Title of the data's options in each subcommand's help."""


class _HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's formatter, keeping the line breaks of the description and the epilog."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


class CovPoolCLI(LightningCLI):
    """LightningCLI that links the data module's ``num_classes`` into the model and lists its subcommands
    with :data:`~lightning_modules.cli_help.SUBCOMMAND_HELP`."""

    def _prepare_subcommand_parser(
        self, klass: type, subcommand: str, **kwargs: Any
    ) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        # the groups' titles are the first line of each docstring, which for some Trainer methods ends
        # mid-sentence and for the data describes the base class
        text = SUBCOMMAND_HELP[subcommand].rstrip(".")
        parser.groups[subcommand].title = f"{subcommand}: {text[0].lower()}{text[1:]}"
        parser.groups["data"].title = DATA_TITLE
        return parser

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        for action in parser._subcommands_action._choices_actions:
            action.help = SUBCOMMAND_HELP[action.dest]

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"data": {"class_path": "lightning_modules.DigitsDataModule"}})
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


def create_cli(args: list[str] | None = None, *, run: bool = True) -> CovPoolCLI:
    """Run the CLI on ``args`` (``sys.argv[1:]`` when ``None``); returns the CLI object.

    With ``run=False`` the arguments take no subcommand and the model, data module and trainer are only
    instantiated (``cli.model``, ``cli.datamodule``, ``cli.trainer``).
    """
    help_kwargs = {
        "prog": "covpool-train",
        "description": DESCRIPTION,
        "epilog": help_epilog(),
        "formatter_class": _HelpFormatter,
    }
    subcommands = {name: {"description": text} for name, text in SUBCOMMAND_HELP.items() if name != "fit"}
    return CovPoolCLI(
        CovPoolClassifier,
        ClassificationDataModule,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={**help_kwargs, **subcommands, "fit": help_kwargs},
    )
