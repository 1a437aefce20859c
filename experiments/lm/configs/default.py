"""The full run: nanoGPT's CPU setting (2,000 steps of 12 windows of 64 characters) for every
trainer, then one-shot 50%, 70%, 2:4 and 4:8 with magnitude, Wanda and SparseGPT."""

from experiments.lm.configs.base import Config


def get_config() -> Config:
    """The full configuration (the dataclass defaults)."""
    return Config()
