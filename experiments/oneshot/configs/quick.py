"""Quick run (a few minutes on 2 CPU cores): the settings it shares with ``cram``,
:data:`experiments._common.QUICK_RECALIBRATION_FILE` (each value with its reason). Same pipeline
and output schema as the full run."""

from experiments._common import QUICK_RECALIBRATION_FILE, config_from_file
from experiments.oneshot.configs.base import Config


def get_config() -> Config:
    """The quick configuration: :class:`Config` with the overrides of
    ``experiments/quick_recalibration.toml``."""
    return config_from_file(Config, QUICK_RECALIBRATION_FILE)
