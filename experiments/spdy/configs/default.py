"""Full run: Fashion-MNIST, 4 training epochs, 16 levels per layer, the reference's search
settings (100 random inits, 100 tries per k) and 30 passes of global AdaPrune
(lr 1e-4)."""

from experiments.spdy.configs.base import Config


def get_config() -> Config:
    """The default configuration."""
    return Config()
