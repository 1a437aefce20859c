"""Full run: every task on its whole dataset (Fashion-MNIST CNN 8 epochs, SST-2 transformer 3
epochs, MNIST MLP 6 + 3 epochs); see :class:`~experiments.surrogate.configs.base.Config`."""

from experiments.surrogate.configs.base import Config


def get_config() -> Config:
    """The full configuration (the defaults of :class:`Config`)."""
    return Config()
