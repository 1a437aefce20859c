"""Command line of the AC/DC experiment (``python -m experiments.acdc``)."""

from __future__ import annotations

import argparse

from experiments.acdc.configs import default, quick
from experiments.acdc.configs.base import MODELS
from experiments.cli import (
    add_run_flags,
    check_dirs,
    non_negative_int,
    positive_int,
    positive_ints,
    run_config,
)
from experiments.oneshot.configs.base import DATASETS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.acdc",
        description=(
            "Train a BatchNorm CNN densely, with AC/DC, with GMP and with one-shot pruning + "
            "fine-tuning at the same epoch budget (global magnitude, 90%% and 95%%); evaluate "
            "the AC/DC sparse-dense pair; track memorisation of random labels under AC/DC. "
            "Writes results.json, accuracy_curves.png and memorisation.png."
        ),
    )
    parser.add_argument("--dataset", choices=DATASETS, default=None, help="default fashion_mnist")
    parser.add_argument("--model", choices=MODELS, default=None, help="default small_cnn")
    parser.add_argument(
        "--widths", type=positive_ints, default=None, help="conv widths, e.g. 16,32,64"
    )
    parser.add_argument(
        "--quick", action="store_true", help="small settings (under 5 minutes on 2 CPU cores)"
    )
    parser.add_argument("--seed", type=non_negative_int, default=None, help="first seed")
    parser.add_argument(
        "--seeds", type=positive_int, default=None, help="number of seeds (mean and std)"
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help="epoch budget of every method; the AC/DC phases scale with it",
    )
    add_run_flags(parser, "runs/acdc")
    parser.add_argument(
        "--no-memorisation", action="store_true", help="skip the random-label memorisation runs"
    )
    parser.add_argument(
        "--memorisation-only",
        action="store_true",
        help="run only the random-label memorisation runs (dense and AC/DC)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_dirs(parser, args)
    config = (quick if args.quick else default).get_config()
    changes: dict = {"progress": not args.no_progress}
    if args.no_memorisation and args.memorisation_only:
        parser.error("--no-memorisation and --memorisation-only exclude each other")
    if args.no_memorisation:
        changes["memorisation"] = False
    if args.memorisation_only:
        changes["memorisation_only"] = True
    if args.seeds is not None:
        changes["num_seeds"] = args.seeds
    for name in ("dataset", "model", "widths", "seed", "epochs", "data_dir"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value

    from experiments.acdc.train import format_table, run

    return run_config(parser, config, changes, run=run, format_table=format_table, out=args.out)
