"""Configurations of the LM experiment: ``default`` (the full run) and ``quick``."""
