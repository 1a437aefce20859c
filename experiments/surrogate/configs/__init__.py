"""Configurations of the latency-surrogate experiment: ``default`` (full) and ``quick``."""

from experiments.surrogate.configs.base import Config

__all__ = ["Config"]
