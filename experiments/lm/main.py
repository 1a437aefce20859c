"""Command line of the LM experiment (``python -m experiments.lm``); the flags are generated
from :class:`experiments.lm.configs.base.Config`."""

from __future__ import annotations

import argparse

from experiments import cli
from experiments.lm.configs import default, quick
from experiments.lm.configs.base import Config


def build_parser() -> argparse.ArgumentParser:
    return cli.build_parser(
        prog="python -m experiments.lm",
        description=(
            "Train a char-level GPT on Tiny Shakespeare with AdamW, CrAM and AC/DC, prune each "
            "in one shot (50%%, 70%%, 2:4, 4:8) with magnitude, Wanda and SparseGPT; write "
            "results.json, a plot and text samples. Rerun into the same --out to resume."
        ),
        config_cls=Config,
        out="runs/lm",
        quick="the quick config (experiments/lm/configs/quick.py): under 5 minutes on 2 CPU "
        "cores, a smaller GPT and fewer steps",
    )


def main(argv: list[str] | None = None) -> int:
    return cli.main(
        argv,
        parser=build_parser(),
        configs=(default, quick),
        train="experiments.lm.train",
        one_device=True,
    )
