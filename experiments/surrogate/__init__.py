"""The l1/l2 latency surrogate against l1 gates (network slimming), uniform width multipliers
and truncated SVD on four CPU-sized tasks (a BatchNorm CNN, ResNet-20, an SST-2 transformer, a
low-rank MLP): FLOPs-vs-accuracy Pareto curves, extraction to physically smaller models and
their measured latency.

Run ``python -m experiments.surrogate --help``. The testable entry point is
:func:`experiments.surrogate.train.run`.
"""
