"""``covpool-train``: LightningCLI for :class:`CovPoolClassifier` on any of the data modules.

``covpool-train --help`` says what it trains, lists the subcommands, the shipped configs with their
installed path and gives example lines; it answers without importing Lightning
(:mod:`lightning_modules.cli_help`). Every other command line builds the CLI
(:func:`lightning_modules.training_cli.create_cli`). Examples::

    covpool-train fit --config lightning_modules/configs/digits_resnet18_isqrtcov.yaml
    covpool-train fit --data lightning_modules.CIFARDataModule --data.root data --model.model resnet18
    covpool-train fit --help

The data module defaults to :class:`DigitsDataModule`; ``num_classes`` of the model is taken from the
data module.
"""

from __future__ import annotations

import sys

from lightning_modules.cli_help import top_level_help

HELP_FLAGS = (["-h"], ["--help"])
"""The command lines answered by :func:`lightning_modules.cli_help.top_level_help`."""


def main(args: list[str] | None = None) -> None:
    """Console entry point ``covpool-train``: returns nothing, so the process exits with status 0.

    The console script calls ``sys.exit(main())``: a returned object would be printed and exit with
    status 1. Errors propagate (status 1), and bad arguments exit with jsonargparse's status 2. The
    top-level help exits with status 0, as argparse's does.
    """
    argv = sys.argv[1:] if args is None else args
    if argv in HELP_FLAGS:
        print(top_level_help())
        raise SystemExit(0)
    # imported here: building the CLI imports Lightning, timm and the model, which the help does not need
    from lightning_modules.training_cli import create_cli

    create_cli(args)


if __name__ == "__main__":
    sys.exit(main())
