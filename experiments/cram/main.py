"""Command line of the CrAM experiment (``python -m experiments.cram``); the flags are
generated from :class:`experiments.cram.configs.base.Config`."""

from experiments import cli

DESCRIPTION = (
    "Train a BatchNorm CNN with SGD, CrAM+Multi and CrAM+N:M, prune each one-shot (global "
    "magnitude at several sparsities, 2:4 and 4:8) with BatchNorm recalibration; print a table, "
    "write results.json and a plot."
)

build_parser, main = cli.command("cram", description=DESCRIPTION)
