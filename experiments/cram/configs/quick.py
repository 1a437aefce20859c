"""Quick run (a few minutes on 2 CPU cores): the settings it shares with ``oneshot``,
:data:`experiments._common.QUICK_RECALIBRATION_FILE` (3 epochs on 20,000 images, about 470
steps per method), then ``quick.toml``. Same pipeline and output schema as the full run."""

import os

from experiments._common import QUICK_RECALIBRATION_FILE, config_from_file
from experiments.cram.configs.base import Config


def get_config() -> Config:
    """The quick configuration: :class:`Config` with the overrides of
    ``experiments/quick_recalibration.toml`` and then of ``quick.toml``."""
    here = os.path.join(os.path.dirname(__file__), "quick.toml")
    return config_from_file(Config, QUICK_RECALIBRATION_FILE, here)
