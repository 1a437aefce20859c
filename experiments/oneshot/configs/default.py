"""Full run: SmallCNN (BN) on all of Fashion-MNIST, SGD + momentum + cosine LR."""

from experiments.oneshot.configs.base import Config


def get_config() -> Config:
    """The full configuration (the defaults of :class:`Config`)."""
    return Config()
