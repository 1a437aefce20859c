"""Full run: BatchNorm SmallCNN on all of Fashion-MNIST, 30 epochs, SGD + momentum + CosineLR.

AC/DC timeline (epochs): dense 0-3, compressed 3-6, 9-12, 15-18, decompressed 6-9, 12-15,
18-24 (the last one absorbs the remainder), final compressed 24-30.
"""

from experiments.acdc.configs.base import Config


def get_config() -> Config:
    """The full configuration (the defaults of :class:`Config`)."""
    return Config()
