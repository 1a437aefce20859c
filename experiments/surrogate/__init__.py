"""The l1/l2 latency surrogate against l1 gates (network slimming), uniform width multipliers
and truncated SVD, on three CPU-sized tasks: FLOPs-vs-accuracy Pareto curves, extraction to
physically smaller models, and their measured latency.

Run ``python -m experiments.surrogate --help``. The testable entry point is
:func:`experiments.surrogate.train.run`.
"""
