"""Independent NumPy oracle for the SPDY dynamic program (no JAX, no pytest).

A plain re-statement, written from the specification in ``algorithms.md`` section 3.2, of
the reference ``SPDY.dp`` (Frantar & Alistarh, "SPDY: Accurate Pruning with Speedup
Guarantees", ICML 2022): Python loops over layers and options, NumPy vectorised over the
time-bucket axis. It is deliberately independent of ``jaxcompress.spdy`` so that
``spdy_dp.py`` (beside it) and the tests can check the JAX solver against it.

Semantics:

* ``bucketsize = budget / buckets``; ``bucket[l][j] = int(round(times[l][j] / bucketsize))``
  (Python ``round``: half to even).
* ``DP`` is ``L x (B + 1)`` initialised to ``+inf``, ``PD`` the same shape initialised to -1.
* Layer 0: for ``j`` ascending, ``DP[0][t] = c`` when ``c < DP[0][t]`` (strictly).
* Layer ``l >= 1``: for ``j`` ascending, skip ``t > B``; compare ``DP[l-1][: B+1-t] + c``
  with ``DP[l][t:]`` and write where strictly smaller (ties keep the lowest ``j``).
* Readout: ``tb = argmin(DP[-1])`` (first minimum), then backtrack through ``PD``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["bucketize", "oracle_dp", "oracle_solve"]


def bucketize(times, budget: float, buckets: int) -> list[list[int]]:
    """Reference bucketisation: ``int(round(t / (budget / buckets)))`` per entry."""
    bucketsize = budget / buckets
    return [[int(round(float(t) / bucketsize)) for t in layer] for layer in times]


def oracle_dp(costs, bucket_times, buckets: int, dtype=np.float64):
    """Run the reference DP on integer bucket times.

    Returns ``(choice, total_cost, used_buckets)``; ``choice`` holds -1s when no profile fits
    (the reference behaviour), with ``total_cost = inf`` and ``used_buckets = -1``.
    """
    num_layers = len(costs)
    width = buckets + 1
    dp = np.full((num_layers, width), np.inf, dtype=dtype)
    pd = np.full((num_layers, width), -1, dtype=np.int64)
    for j, (c, t) in enumerate(zip(costs[0], bucket_times[0], strict=True)):
        c = dtype(c)
        if t <= buckets and c < dp[0, t]:
            dp[0, t] = c
            pd[0, t] = j
    for layer in range(1, num_layers):
        prev = dp[layer - 1]
        row = dp[layer]
        prow = pd[layer]
        for j, (c, t) in enumerate(zip(costs[layer], bucket_times[layer], strict=True)):
            c = dtype(c)
            if t > buckets:
                continue
            if t == 0:
                cand = prev + c
                better = cand < row
                row[better] = cand[better]
                prow[better] = j
            else:
                cand = prev[:-t] + c
                better = cand < row[t:]
                row[t:][better] = cand[better]
                prow[t:][better] = j
    tb = int(np.argmin(dp[-1]))
    score = dp[-1, tb]
    if not np.isfinite(score):
        return [-1] * num_layers, float("inf"), -1
    used = tb
    choice = [0] * num_layers
    for layer in range(num_layers - 1, -1, -1):
        j = int(pd[layer, tb])
        choice[layer] = j
        tb -= bucket_times[layer][j]
    return choice, float(score), used


def oracle_solve(costs, times, budget: float, buckets: int = 10_000, dtype=np.float64):
    """Bucketise ``times`` for ``budget`` and run :func:`oracle_dp`."""
    return oracle_dp(costs, bucketize(times, budget, buckets), buckets, dtype=dtype)
