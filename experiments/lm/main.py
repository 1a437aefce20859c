"""Command line of the LM experiment (``python -m experiments.lm``); the flags are generated
from :class:`experiments.lm.configs.base.Config`."""

from experiments import cli

DESCRIPTION = (
    "Train a char-level GPT on Tiny Shakespeare with AdamW, CrAM and AC/DC, prune each "
    "in one shot (50%%, 70%%, 2:4, 4:8) with magnitude, Wanda and SparseGPT; write "
    "results.json, a plot and text samples. Rerun into the same --out to resume."
)

build_parser, main = cli.command(
    "lm",
    description=DESCRIPTION,
    quick="under 5 minutes on 2 CPU cores, a smaller GPT and fewer steps",
    one_device=True,
)
