"""Command line of the CrAM experiment (``python -m experiments.cram``); the flags are
generated from :class:`experiments.cram.configs.base.Config`."""

from __future__ import annotations

import argparse

from experiments import cli
from experiments.cram.configs import default, quick
from experiments.cram.configs.base import Config


def build_parser() -> argparse.ArgumentParser:
    return cli.build_parser(
        prog="python -m experiments.cram",
        description=(
            "Train a BatchNorm CNN with SGD, CrAM+Multi and CrAM+N:M, prune each one-shot "
            "(global magnitude at several sparsities, 2:4 and 4:8) with BatchNorm "
            "recalibration; print a table, write results.json and a plot."
        ),
        config_cls=Config,
        out="runs/cram",
        quick="the quick config (experiments/cram/configs/quick.py): a few minutes on 2 CPU "
        "cores, the same story as the full run",
    )


def main(argv: list[str] | None = None) -> int:
    return cli.main(
        argv, parser=build_parser(), configs=(default, quick), train="experiments.cram.train"
    )
