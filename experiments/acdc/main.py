"""Command line of the AC/DC experiment (``python -m experiments.acdc``); the flags are
generated from :class:`experiments.acdc.configs.base.Config`."""

from __future__ import annotations

import argparse

from experiments import cli
from experiments.acdc.configs import default, quick
from experiments.acdc.configs.base import Config


def build_parser() -> argparse.ArgumentParser:
    return cli.build_parser(
        prog="python -m experiments.acdc",
        description=(
            "Train a BatchNorm CNN densely, with AC/DC, with GMP and with one-shot pruning + "
            "fine-tuning at the same epoch budget (global magnitude, 90%% and 95%%); evaluate "
            "the AC/DC sparse-dense pair; track memorisation of random labels under AC/DC. "
            "Writes results.json, accuracy_curves.png and memorisation.png."
        ),
        config_cls=Config,
        out="runs/acdc",
        quick="the quick config (experiments/acdc/configs/quick.py): a few minutes on 2 CPU "
        "cores, the same story as the full run",
    )


def main(argv: list[str] | None = None) -> int:
    return cli.main(
        argv, parser=build_parser(), configs=(default, quick), train="experiments.acdc.train"
    )
