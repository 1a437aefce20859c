"""Configurations of the AC/DC experiment: ``default`` (full) and ``quick``."""

from experiments.acdc.configs.base import Config

__all__ = ["Config"]
