"""Command line of the SPDY experiment (``python -m experiments.spdy``)."""

from __future__ import annotations

import argparse
import math
import os

from experiments.cli import (
    add_run_flags,
    check_dirs,
    comma_separated,
    non_negative_int,
    positive_int,
    positive_ints,
    run_config,
)
from experiments.spdy.configs import default, quick
from experiments.spdy.configs.base import DATASETS, FAMILIES

_speedups = comma_separated(
    float,
    valid=lambda v: math.isfinite(v) and v > 1.0,
    expected="distinct comma-separated speedups > 1 such as 1.5,2,3",
    distinct=True,
)

_families = comma_separated(
    str,
    valid=lambda f: f in FAMILIES,
    expected=f"distinct comma-separated names from {', '.join(FAMILIES)}",
    distinct=True,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.spdy",
        description=(
            "Train a 7-conv SmallCNN, build SPDY reconstruction databases (unstructured masks "
            "with a FLOPs table and with a sparse-CPU-runtime table, channel units with a table "
            "measured on this CPU), and compare SPDY search, DP-only, uniform and "
            "global-magnitude profiles at 1.5x/2x/3x; check measured vs predicted time."
        ),
    )
    parser.add_argument("--dataset", choices=DATASETS, default=None, help="default fashion_mnist")
    parser.add_argument(
        "--quick", action="store_true", help="small settings (under 5 minutes on 2 CPU cores)"
    )
    parser.add_argument("--seed", type=non_negative_int, default=None)
    parser.add_argument(
        "--widths",
        type=positive_ints,
        default=None,
        help="conv widths, one per block (default 16,16,32,32,64,64,128; strides 2,1,2,1,2,1,1)",
    )
    parser.add_argument(
        "--families",
        type=_families,
        default=None,
        help=f"option families to run (default all: {','.join(FAMILIES)})",
    )
    parser.add_argument(
        "--speedups",
        type=_speedups,
        default=None,
        help="modelled speedup targets (default 1.5,2,3)",
    )
    parser.add_argument(
        "--timing-batch",
        type=positive_int,
        default=None,
        help="images per timed call (default 512; calibration images cycled past 1024); a GPU "
        "needs thousands before its run time follows the work",
    )
    parser.add_argument(
        "--timing-clock",
        choices=("auto", "cpu", "wall"),
        default=None,
        help="clock of the timing tables and checks (default auto: process CPU time on the "
        "CPU backend, wall time on an accelerator)",
    )
    parser.add_argument(
        "--channel-multiple",
        type=positive_int,
        default=None,
        help="channel units keep a multiple of this many channels (default 1)",
    )
    add_run_flags(parser, "runs/spdy")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="restore the dense model from this Orbax directory (<out>/checkpoint of a run)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_dirs(parser, args)
    if args.checkpoint is not None and not os.path.isdir(args.checkpoint):
        parser.error(f"--checkpoint: {args.checkpoint!r} is not a directory")
    config = (quick if args.quick else default).get_config()
    changes = {"progress": not args.no_progress}
    for name in (
        "dataset",
        "seed",
        "widths",
        "families",
        "speedups",
        "timing_batch",
        "timing_clock",
        "channel_multiple",
        "data_dir",
        "checkpoint",
    ):
        value = getattr(args, name)
        if value is not None:
            changes[name] = os.path.abspath(value) if name == "checkpoint" else value

    from experiments.spdy.train import format_table, run

    return run_config(parser, config, changes, run=run, format_table=format_table, out=args.out)
