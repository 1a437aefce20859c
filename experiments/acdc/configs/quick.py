"""Quick run (under 5 minutes on 2 CPU cores): narrow SmallCNN, training and test subsets,
10 epochs (dense 0-1, C 1-2, D 2-3, C 3-4, D 4-8, final C 8-10). Same pipeline and output
schema as the full run. The values, each with its reason, are in ``quick.toml``."""

import os

from experiments._common import config_from_file
from experiments.acdc.configs.base import Config


def get_config() -> Config:
    """The quick configuration: :class:`Config` with the overrides of ``quick.toml``."""
    return config_from_file(Config, os.path.join(os.path.dirname(__file__), "quick.toml"))
