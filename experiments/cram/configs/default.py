"""Full run: the BatchNorm SmallCNN on all of Fashion-MNIST; SGD, CrAM+Multi {0.5, 0.7, 0.9}
and CrAM+N:M {2:4, 4:8} for the same epochs; one-shot pruning with the reference BNT."""

from experiments.cram.configs.base import Config


def get_config() -> Config:
    """The full configuration (the defaults of :class:`Config`)."""
    return Config()
