"""The independent NumPy oracle of SPDY's DP, shared with ``experiments/benchmarks/spdy_dp.py``.

The oracle lives beside the benchmark (benchmarks import nothing from ``tests/``); the tests
import it from there.
"""

from experiments.benchmarks.spdy_oracle import bucketize, oracle_dp, oracle_solve

__all__ = ["bucketize", "oracle_dp", "oracle_solve"]
