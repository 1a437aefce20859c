"""CrAM+ reproduction: one-shot prunability of SGD vs CrAM+Multi vs CrAM+N:M training.

Run ``python -m experiments.cram --help``. The testable entry point is
:func:`experiments.cram.train.run`.
"""
