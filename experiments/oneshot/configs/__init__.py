"""Configurations of the one-shot pruning experiment: ``default`` (full) and ``quick``."""

from experiments.oneshot.configs.base import Config

__all__ = ["Config"]
