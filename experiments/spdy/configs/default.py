"""Full run: Fashion-MNIST, a 7-conv BN CNN trained for 8 epochs (92-93% test accuracy), 16
levels per layer from 0.4 to 0.99 sparsity, the reference's search settings (100 random
inits, 100 tries per k), 20 passes of global AdaPrune (lr 1e-4), and the measured channel
table at batch 512 (CPU clock, single-threaded executables, units timed in context)."""

from experiments.spdy.configs.base import Config


def get_config() -> Config:
    """The default configuration."""
    return Config()
