"""One-shot magnitude / 2:4 pruning of a BatchNorm CNN, with and without BN recalibration.

Run ``python -m experiments.oneshot --help``. The testable entry point is
:func:`experiments.oneshot.train.run`.
"""
