"""AC/DC vs GMP vs one-shot + fine-tuning at the same epoch budget, and memorisation under AC/DC.

Run ``python -m experiments.acdc --help``. The testable entry point is
:func:`experiments.acdc.train.run`.
"""
