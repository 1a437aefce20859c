"""Quick run (a few minutes per task on 2 CPU cores): half-width models, 8,000 training and
2,000 test examples, 3 epochs (1 after extraction), two targets and a larger initial lambda (a
125-step penalty phase has no epoch to spare before pruning starts). Same pipeline and output
schema as the full run. The values, each with its reason, are in ``quick.toml``."""

import os

from experiments._common import config_from_file
from experiments.surrogate.configs.base import Config


def get_config() -> Config:
    """The quick configuration: :class:`Config` with the overrides of ``quick.toml``."""
    return config_from_file(Config, os.path.join(os.path.dirname(__file__), "quick.toml"))
