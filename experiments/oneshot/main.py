"""Command line of the one-shot pruning experiment (``python -m experiments.oneshot``); the
flags are generated from :class:`experiments.oneshot.configs.base.Config`."""

from experiments import cli

DESCRIPTION = (
    "Train a BatchNorm CNN, prune it in one shot (global magnitude at several sparsities and "
    "2:4), with and without BatchNorm recalibration; write results.json and a plot."
)

build_parser, main = cli.command("oneshot", description=DESCRIPTION)
