"""Quick run (a few minutes on 2 CPU cores): :data:`experiments._common.QUICK_RECALIBRATION`
(3 epochs on 20,000 images, about 470 steps per method). Same pipeline and output schema as
the full run."""

from experiments._common import QUICK_RECALIBRATION
from experiments.cram.configs.base import Config


def get_config() -> Config:
    """The quick configuration."""
    return Config(**QUICK_RECALIBRATION, eval_batch_size=500)
