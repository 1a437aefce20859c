"""Command line of the SPDY experiment (``python -m experiments.spdy``); the flags are
generated from :class:`experiments.spdy.configs.base.Config`."""

from __future__ import annotations

import argparse

from experiments import cli
from experiments.spdy.configs import default, quick
from experiments.spdy.configs.base import Config


def build_parser() -> argparse.ArgumentParser:
    return cli.build_parser(
        prog="python -m experiments.spdy",
        description=(
            "Train a 7-conv SmallCNN, build SPDY reconstruction databases (unstructured masks "
            "with a FLOPs table and with a sparse-CPU-runtime table, channel units with a table "
            "measured on this CPU), and compare SPDY search, DP-only, uniform and "
            "global-magnitude profiles at 1.5x/2x/3x; check measured vs predicted time."
        ),
        config_cls=Config,
        out="runs/spdy",
        quick="the quick config (experiments/spdy/configs/quick.py): a few minutes on 2 CPU "
        "cores, the same pipeline and schema as the full run",
    )


def main(argv: list[str] | None = None) -> int:
    return cli.main(
        argv, parser=build_parser(), configs=(default, quick), train="experiments.spdy.train"
    )
