"""Quick run (a few minutes on 2 CPU cores): :data:`experiments._common.QUICK_RECALIBRATION`.
Same pipeline and output schema as the full run."""

from experiments._common import QUICK_RECALIBRATION
from experiments.oneshot.configs.base import Config


def get_config() -> Config:
    """The quick configuration."""
    return Config(**QUICK_RECALIBRATION)
