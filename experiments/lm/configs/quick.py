"""Quick run (under 5 minutes on 2 idle CPU cores): a narrower 2-layer GPT, 300 steps per
trainer, fewer calibration and validation windows, SPDY at 1.5x only. Same pipeline and output
schema as the full run. The values, each with its reason, are in ``quick.toml``."""

import os

from experiments._common import config_from_file
from experiments.lm.configs.base import Config


def get_config() -> Config:
    """The quick configuration: :class:`Config` with the overrides of ``quick.toml``."""
    return config_from_file(Config, os.path.join(os.path.dirname(__file__), "quick.toml"))
