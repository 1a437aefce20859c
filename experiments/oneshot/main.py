"""Command line of the one-shot pruning experiment (``python -m experiments.oneshot``)."""

from __future__ import annotations

import argparse

from experiments.cli import add_run_flags, check_dirs, non_negative_int, positive_int, run_config
from experiments.oneshot.configs import default, quick
from experiments.oneshot.configs.base import DATASETS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.oneshot",
        description=(
            "Train a BatchNorm CNN, prune it in one shot (global magnitude at several sparsities "
            "and 2:4), with and without BatchNorm recalibration; write results.json and a plot."
        ),
    )
    parser.add_argument("--dataset", choices=DATASETS, default=None, help="default fashion_mnist")
    parser.add_argument(
        "--quick", action="store_true", help="small settings (under 3 minutes on 2 CPU cores)"
    )
    parser.add_argument("--seed", type=non_negative_int, default=None)
    parser.add_argument("--epochs", type=positive_int, default=None)
    add_run_flags(parser, "runs/oneshot")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_dirs(parser, args)
    config = (quick if args.quick else default).get_config()
    changes = {"progress": not args.no_progress}
    for name in ("dataset", "seed", "epochs", "data_dir"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value

    from experiments.oneshot.train import format_table, run

    return run_config(parser, config, changes, run=run, format_table=format_table, out=args.out)
