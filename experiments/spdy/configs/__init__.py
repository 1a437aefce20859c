"""Configurations of the SPDY experiment: ``default`` (full) and ``quick``."""

from experiments.spdy.configs.base import Config

__all__ = ["Config"]
