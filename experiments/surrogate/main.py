"""Command line of the latency-surrogate experiment (``python -m experiments.surrogate``); the
flags are generated from :class:`experiments.surrogate.configs.base.Config`."""

from experiments import cli

DESCRIPTION = (
    "FLOPs-vs-accuracy Pareto curves of the l1/l2 latency surrogate (Nasery et al., 2023) on "
    "models it gates generically (jaxcompress.latency.gated): a BatchNorm CNN and a ResNet-20 "
    "against l1 gates and uniform widths, a transformer's heads and FFN units on SST-2, and "
    "low-rank gates against truncated SVD on an MLP. Every compressed model is extracted, "
    "counted exactly and timed on this device. Writes results.json and pareto_<task>.png."
)

build_parser, main = cli.command("surrogate", description=DESCRIPTION)
