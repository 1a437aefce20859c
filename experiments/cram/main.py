"""Command line of the CrAM experiment (``python -m experiments.cram``)."""

from __future__ import annotations

import argparse
import math

from experiments.cli import (
    add_run_flags,
    check_dirs,
    comma_separated,
    non_negative_int,
    positive_int,
    run_config,
)
from experiments.cram.configs import default, quick
from experiments.cram.configs.base import METHODS, MODELS
from experiments.oneshot.configs.base import DATASETS


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


_methods = comma_separated(
    str,
    valid=lambda name: name in METHODS,
    distinct=True,
    expected=f"distinct comma-separated names from {', '.join(METHODS)}",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.cram",
        description=(
            "Train a BatchNorm CNN with SGD, CrAM+Multi and CrAM+N:M, prune each one-shot "
            "(global magnitude at several sparsities, 2:4 and 4:8) with BatchNorm "
            "recalibration; print a table, write results.json and a plot."
        ),
    )
    parser.add_argument("--dataset", choices=DATASETS, default=None, help="default fashion_mnist")
    parser.add_argument("--model", choices=MODELS, default=None, help="default small_cnn")
    parser.add_argument(
        "--quick", action="store_true", help="small settings (under 5 minutes on 2 CPU cores)"
    )
    parser.add_argument(
        "--seeds", type=positive_int, default=None, help="repetitions (mean and std), default 1"
    )
    parser.add_argument("--seed", type=non_negative_int, default=None, help="first seed")
    parser.add_argument("--epochs", type=positive_int, default=None)
    parser.add_argument("--rho", type=_non_negative_float, default=None, help="CrAM radius")
    parser.add_argument(
        "--methods",
        type=_methods,
        default=None,
        help=f"comma-separated subset of {','.join(METHODS)} (default all)",
    )
    add_run_flags(parser, "runs/cram")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_dirs(parser, args)
    config = (quick if args.quick else default).get_config()
    changes = {"progress": not args.no_progress}
    for flag, field in (
        ("dataset", "dataset"),
        ("model", "model"),
        ("seeds", "num_seeds"),
        ("seed", "seed"),
        ("epochs", "epochs"),
        ("rho", "rho"),
        ("methods", "methods"),
        ("data_dir", "data_dir"),
    ):
        value = getattr(args, flag)
        if value is not None:
            changes[field] = value

    from experiments.cram.train import format_table, run

    return run_config(parser, config, changes, run=run, format_table=format_table, out=args.out)
