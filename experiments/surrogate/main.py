"""Command line of the latency-surrogate experiment (``python -m experiments.surrogate``)."""

from __future__ import annotations

import argparse

from experiments.cli import (
    add_run_flags,
    check_dirs,
    comma_separated,
    non_negative_int,
    positive_int,
    run_config,
)
from experiments.surrogate.configs import default, quick
from experiments.surrogate.configs.base import (
    BUDGET_CRITERIA,
    CNN_ROUNDINGS,
    IMAGE_DATASETS,
    NORMALIZE_LAST,
    SCALES,
    TASKS,
)

_tasks = comma_separated(
    str,
    valid=lambda t: t in TASKS,
    distinct=True,
    expected=f"distinct comma-separated tasks from {','.join(TASKS)}",
)
_targets = comma_separated(
    float,
    valid=lambda v: 0.0 < v < 1.0,
    expected="comma-separated FLOPs fractions in (0, 1) such as 0.5,0.35,0.2",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.surrogate",
        description=(
            "FLOPs-vs-accuracy Pareto curves of the l1/l2 latency surrogate (Nasery et al., "
            "2023): a gated BN CNN against l1 gates and uniform widths, a gated transformer on "
            "SST-2, and low-rank gates against truncated SVD on an MLP; every compressed model "
            "is extracted, counted exactly and timed on this CPU. Writes results.json and "
            "pareto_<task>.png."
        ),
    )
    parser.add_argument(
        "--tasks", type=_tasks, default=None, help=f"comma-separated subset of {','.join(TASKS)}"
    )
    parser.add_argument(
        "--cnn-dataset", choices=IMAGE_DATASETS, default=None, help="default fashion_mnist"
    )
    parser.add_argument("--mlp-dataset", choices=IMAGE_DATASETS, default=None, help="default mnist")
    parser.add_argument(
        "--quick", action="store_true", help="small settings (under 5 minutes on 2 CPU cores)"
    )
    parser.add_argument("--seed", type=non_negative_int, default=None, help="first seed")
    parser.add_argument(
        "--seeds", type=positive_int, default=None, help="number of seeds (mean and std)"
    )
    parser.add_argument(
        "--cnn-epochs", type=positive_int, default=None, help="epoch budget of every CNN"
    )
    parser.add_argument(
        "--sst2-epochs", type=positive_int, default=None, help="epoch budget of every transformer"
    )
    parser.add_argument(
        "--mlp-epochs", type=positive_int, default=None, help="epochs of the dense MLP"
    )
    parser.add_argument(
        "--cnn-targets", type=_targets, default=None, help="CNN FLOPs targets, e.g. 0.5,0.35,0.2"
    )
    parser.add_argument(
        "--cnn-channel-multiple",
        type=positive_int,
        default=None,
        help="round the compressed CNNs' channel counts up to multiples of this (default 1)",
    )
    parser.add_argument(
        "--cnn-rounding",
        choices=CNN_ROUNDINGS,
        default=None,
        help="how rounding meets the FLOPs target: the controller steers the rounded cost "
        "(steer), extraction rounds up after steering exact counts (extract), or rounds "
        "within the target (budget, default)",
    )
    parser.add_argument(
        "--cnn-budget-criterion",
        choices=BUDGET_CRITERIA,
        default=None,
        help="what budget rounding drops first: least calibration-loss increase (loss, "
        "default) or least relative gate mass (gates) per MAC saved",
    )
    parser.add_argument(
        "--cnn-latency-targets",
        type=_targets,
        default=None,
        help="also run the latency form of the surrogate, steered to these fractions of the "
        "modelled full-width CNN latency (measured on this device first), e.g. 0.5,0.35",
    )
    parser.add_argument(
        "--no-cnn-latency-padding",
        dest="cnn_latency_padding",
        action="store_false",
        default=None,
        help="extract latency-form models at their steered widths, without widening a layer "
        "to a wider width that the measured grid runs faster",
    )
    parser.add_argument(
        "--scale",
        choices=SCALES,
        default=None,
        help="push of the l1/l2 penalty per gate group: its gradient (none, default) or the "
        "gradient times the rms of the group's gates (rms), which does not fade as gates grow",
    )
    parser.add_argument(
        "--cnn-normalize-last",
        dest="cnn_normalize_last_gates",
        choices=NORMALIZE_LAST,
        default=None,
        help="which CNN runs divide the last block's gates by their rms: the l1/l2 surrogate "
        "runs (surrogate, default), l1 too (all) or none (the default before 2026-11-23)",
    )
    parser.add_argument("--sst2-targets", type=_targets, default=None, help="SST-2 FLOPs targets")
    parser.add_argument("--mlp-targets", type=_targets, default=None, help="MLP FLOPs targets")
    add_run_flags(parser, "runs/surrogate")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_dirs(parser, args)
    config = (quick if args.quick else default).get_config()
    changes: dict = {"progress": not args.no_progress}
    if args.seeds is not None:
        changes["num_seeds"] = args.seeds
    for name in (
        "tasks",
        "cnn_dataset",
        "mlp_dataset",
        "seed",
        "cnn_epochs",
        "sst2_epochs",
        "mlp_epochs",
        "cnn_targets",
        "cnn_latency_targets",
        "cnn_latency_padding",
        "cnn_channel_multiple",
        "cnn_rounding",
        "cnn_budget_criterion",
        "scale",
        "cnn_normalize_last_gates",
        "sst2_targets",
        "mlp_targets",
        "data_dir",
    ):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value

    from experiments.surrogate.train import format_table, run

    return run_config(parser, config, changes, run=run, format_table=format_table, out=args.out)
