"""Full run: every task on its whole dataset with the task defaults of
:data:`~experiments.surrogate.configs.base.TASK_DEFAULTS` (Fashion-MNIST CNN and ResNet-20 8
epochs, SST-2 transformer 2 epochs, MNIST MLP 6 + 6 epochs)."""

from experiments.surrogate.configs.base import Config


def get_config() -> Config:
    """The full configuration (the defaults of :class:`Config`)."""
    return Config()
