"""Command line of the SPDY experiment (``python -m experiments.spdy``); the flags are
generated from :class:`experiments.spdy.configs.base.Config`."""

from experiments import cli

DESCRIPTION = (
    "Train a 7-conv SmallCNN, build SPDY reconstruction databases (unstructured masks with a "
    "FLOPs table and with a sparse-CPU-runtime table, channel units with a table measured on "
    "this CPU), and compare SPDY search, DP-only, uniform and global-magnitude profiles at "
    "1.5x/2x/3x; check measured vs predicted time."
)

build_parser, main = cli.command("spdy", description=DESCRIPTION)
