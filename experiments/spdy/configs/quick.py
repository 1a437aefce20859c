"""Quick run (a few minutes on 2 CPU cores): 3 epochs on a 12,000-image training subset (about
280 steps, enough for the dense model to be within 3 points of the full run on MNIST), 6
levels, 512 calibration images, a short search and short reconstructions. Same pipeline and
schema as the full run. The values, each with its reason, are in ``quick.toml``."""

import os

from experiments._common import config_from_file
from experiments.spdy.configs.base import Config


def get_config() -> Config:
    """The quick configuration: :class:`Config` with the overrides of ``quick.toml``."""
    return config_from_file(Config, os.path.join(os.path.dirname(__file__), "quick.toml"))
