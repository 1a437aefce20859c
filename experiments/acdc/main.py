"""Command line of the AC/DC experiment (``python -m experiments.acdc``); the flags are
generated from :class:`experiments.acdc.configs.base.Config`."""

from experiments import cli

DESCRIPTION = (
    "Train a BatchNorm CNN densely, with AC/DC, with GMP and with one-shot pruning + "
    "fine-tuning at the same epoch budget (global magnitude, 90% and 95%); evaluate the AC/DC "
    "sparse-dense pair; track memorisation of random labels under AC/DC. Writes results.json, "
    "accuracy_curves.png and memorisation.png."
)

build_parser, main = cli.command("acdc", description=DESCRIPTION)
