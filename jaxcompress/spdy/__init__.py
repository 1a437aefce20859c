"""SPDY: speedup-constrained layer-wise compression (Frantar & Alistarh, ICML 2022).

* :func:`solve` / :func:`solve_batch` / :func:`prepare`: the exact, jit-compiled DP that picks
  one option per layer minimising total cost under a time budget (reference semantics).
* :class:`TimingTable`: per-layer option times (reference text format, JSON, analytic
  ``from_flops``, measured with :func:`measure`).
* :func:`budget`, :func:`max_speedup`, :func:`modelled_speedup`, :func:`prior_errors`: the
  reference's budget and error-prior accounting.

Float64 is the default DP dtype (needed for bit-parity with the reference); it runs under a
local ``jax.enable_x64(True)`` and never flips the global flag.
"""

from jaxcompress.spdy._dp import (
    InfeasibleBudgetError,
    PreparedDP,
    Solution,
    bucketize,
    prepare,
    solve,
    solve_batch,
)
from jaxcompress.spdy._measure import measure, time_callable
from jaxcompress.spdy._tables import (
    LayerOptions,
    TimingTable,
    budget,
    max_speedup,
    modelled_speedup,
    prior_errors,
)

__all__ = [
    "InfeasibleBudgetError",
    "LayerOptions",
    "PreparedDP",
    "Solution",
    "TimingTable",
    "bucketize",
    "budget",
    "max_speedup",
    "measure",
    "modelled_speedup",
    "prepare",
    "prior_errors",
    "solve",
    "solve_batch",
    "time_callable",
]
