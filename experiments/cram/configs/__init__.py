"""Configurations of the CrAM experiment: ``default`` (full) and ``quick``."""

from experiments.cram.configs.base import Config

__all__ = ["Config"]
