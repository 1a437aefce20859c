"""Command line of the one-shot pruning experiment (``python -m experiments.oneshot``); the
flags are generated from :class:`experiments.oneshot.configs.base.Config`."""

from __future__ import annotations

import argparse

from experiments import cli
from experiments.oneshot.configs import default, quick
from experiments.oneshot.configs.base import Config


def build_parser() -> argparse.ArgumentParser:
    return cli.build_parser(
        prog="python -m experiments.oneshot",
        description=(
            "Train a BatchNorm CNN, prune it in one shot (global magnitude at several sparsities "
            "and 2:4), with and without BatchNorm recalibration; write results.json and a plot."
        ),
        config_cls=Config,
        out="runs/oneshot",
        quick="the quick config (experiments/oneshot/configs/quick.py): a few minutes on 2 CPU "
        "cores, the same story as the full run",
    )


def main(argv: list[str] | None = None) -> int:
    return cli.main(
        argv, parser=build_parser(), configs=(default, quick), train="experiments.oneshot.train"
    )
