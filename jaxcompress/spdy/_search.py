"""SPDY's search over per-layer error coefficients.

Reference: E. Frantar and D. Alistarh, "SPDY: Accurate Pruning with Speedup Guarantees",
ICML 2022 (arXiv:2201.13096), Sec. 3.2 and Algorithm 1; ``SPDY.search`` in GitHub
``IST-DASLab/spdy``.

The DP (:func:`jaxcompress.spdy.solve`) picks one option per layer minimising
``sum_l c_l e_l(j_l)`` under the time budget. SPDY does not trust the errors ``e_l`` (by
default the layer-independent prior ``e_l(j) = (j / (n_l - 1))^2``): it searches the
coefficients ``c in [0, 1]^L`` so that the DP's profile minimises the *actual* calibration
loss ``score(profile)`` of the stitched model:

1. draw ``randinits`` vectors ``c ~ U[0, 1]^L``, solve the DP for each (one batched call to
   :meth:`PreparedDP.solve_batch`), score the profiles, keep the best;
2. local search, for ``k = max(1, round(layerperc * L))`` down to 1: a mutation copies the best
   ``c`` and redraws ``k`` coordinates (indices drawn with replacement, as the reference) from
   ``U[0, 1]``; the first mutation whose score is *strictly* lower is accepted and the count
   of failed tries restarts; the search moves to ``k - 1`` after ``maxnoimp`` failures in a row.

Unlike the reference (Python ``random``, never seeded) every draw comes from one
``numpy.random.Generator`` seeded by ``seed``, so a search is reproducible bit for bit given a
deterministic ``score_fn``. Scores are cached by profile: different coefficient vectors often
give the same profile, and the stitched model is then not evaluated again. Mutations are drawn
and solved in chunks of ``dp_batch`` (one batched DP call), then scored in order until the
first improvement; the unused rest of a chunk is discarded. The best score after every scored
candidate is recorded in ``history``, which therefore never increases.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxcompress._checks import check_int
from jaxcompress.spdy._dp import PreparedDP, prepare
from jaxcompress.spdy._tables import TimingTable, prior_errors

__all__ = ["SearchResult", "search"]


class SearchResult(NamedTuple):
    """Result of :func:`search`.

    Attributes:
      choice: ``int64[L]``, the best profile (option index per layer).
      coefficients: ``float64[L]``, the coefficients whose DP solution is ``choice``.
      score: its score (the lowest seen).
      history: ``float64[n]``, best score so far after each of the ``n`` candidates scored
        (cache hits included); non-increasing.
      evaluations: number of distinct profiles scored (calls of ``score_fn``).
      candidates: number of coefficient vectors solved by the DP.
      seconds: wall time of the search.
    """

    choice: np.ndarray
    coefficients: np.ndarray
    score: float
    history: np.ndarray
    evaluations: int
    candidates: int
    seconds: float


def _as_errors(errors: Any, times: list[np.ndarray], table: Any) -> list[np.ndarray]:
    if isinstance(errors, str):
        if errors != "prior":
            raise ValueError(f"errors must be per-layer arrays or 'prior'; got {errors!r}")
        return prior_errors([len(t) for t in times])
    try:
        rows = [np.asarray(e, np.float64) for e in errors]
    except (TypeError, ValueError):
        raise TypeError(f"errors must be a sequence of per-layer arrays; got {errors!r}") from None
    if len(rows) != len(times):
        raise ValueError(f"errors has {len(rows)} layers but the table has {len(times)}")
    for i, (e, t) in enumerate(zip(rows, times, strict=True)):
        if e.shape != t.shape:
            raise ValueError(f"errors[{i}] has shape {e.shape}; the table has {t.shape[0]} options")
        if not np.all(np.isfinite(e)) or np.any(e < 0):
            raise ValueError(f"errors[{i}] must be finite and non-negative; got {e.tolist()}")
    return rows


def search(
    errors: Sequence[Any] | str,
    table: TimingTable | Sequence[Any] | PreparedDP,
    budget: float | None,
    score_fn: Callable[[np.ndarray], float],
    *,
    seed: int = 0,
    randinits: int = 100,
    maxnoimp: int = 100,
    layerperc: float = 0.1,
    buckets: int = 10_000,
    dp_batch: int = 16,
    initial: Any = None,
    progress: bool = True,
) -> SearchResult:
    """SPDY's coefficient search (module docstring): best DP profile by calibration score.

    Args:
      errors: per-layer error arrays ``e_l`` (e.g. :meth:`Database.error_list`) or ``"prior"``
        for :func:`jaxcompress.spdy.prior_errors` (the reference's default).
      table: a :class:`TimingTable` (its layers are the DP's), per-layer option times, or a
        :class:`PreparedDP` (then ``budget`` must be ``None``).
      budget: the time budget of the layers (:func:`jaxcompress.spdy.budget`).
      score_fn: ``choice (int64[L]) -> float``, e.g. the mean calibration loss of the
        stitched model in eval mode. Lower is better; NaN counts as ``+inf``.
      seed: seeds the ``numpy.random.Generator`` of every draw.
      randinits: random initial coefficient vectors (reference 100).
      maxnoimp: failed mutations in a row before ``k`` decreases (reference 100).
      layerperc: the first ``k`` is ``max(1, round(layerperc * L))`` (reference 0.1).
      buckets: DP resolution (reference 10 000).
      dp_batch: mutations solved per batched DP call.
      initial: optional ``(k, L)`` coefficient vectors (finite, ``>= 0``) scored before the
        random ones, e.g. ``[np.ones(L)]``: the DP on ``errors`` as given. The reference draws
        only random vectors, so its search can end on a profile that scores worse than the DP
        alone; with ``np.ones`` among ``initial`` it cannot. The random draws are the same as
        without ``initial``.
      progress: print one line per improvement and per ``k``.

    Returns:
      A :class:`SearchResult`.
    """
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable; got {score_fn!r}")
    seed = check_int("seed", seed, minimum=0)
    randinits = check_int("randinits", randinits, minimum=1)
    maxnoimp = check_int("maxnoimp", maxnoimp, minimum=0)
    dp_batch = check_int("dp_batch", dp_batch, minimum=1)
    if (
        isinstance(layerperc, bool)
        or not isinstance(layerperc, (int, float, np.floating))
        or not 0.0 <= float(layerperc) <= 1.0
    ):
        raise ValueError(f"layerperc must be a float in [0, 1]; got {layerperc!r}")
    if isinstance(table, PreparedDP):
        if budget is not None:
            raise ValueError("budget must be None when table is a PreparedDP")
        dp = table
        times = [np.zeros(int(n)) for n in dp.lengths]
    else:
        if budget is None:
            raise ValueError("budget is required unless table is a PreparedDP; got None")
        times = table.times() if isinstance(table, TimingTable) else [np.asarray(t) for t in table]
        dp = prepare(times, budget, buckets=buckets)
    errs = _as_errors(errors, times, table)
    num_layers = len(errs)
    if initial is not None:
        try:
            initial = np.asarray(initial, np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"initial must be a (k, {num_layers}) array; got {initial!r}") from None
        if initial.ndim != 2 or initial.shape[0] < 1 or initial.shape[1] != num_layers:
            raise ValueError(
                f"initial must be a (k >= 1, {num_layers}) array (one coefficient per layer); "
                f"got shape {initial.shape}"
            )
        bad = ~np.isfinite(initial) | (initial < 0)
        if bad.any():
            row, col = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"initial must be finite and >= 0; got {float(initial[row, col])!r} at "
                f"initial[{row}, {col}]"
            )

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    cache: dict[tuple[int, ...], float] = {}
    history: list[float] = []
    best: dict[str, Any] = {"score": math.inf, "choice": None, "coef": None}
    counts = {"candidates": 0}

    def solve(coefs: np.ndarray) -> np.ndarray:
        # Fixed chunks of dp_batch rows (the last padded by repetition): one compiled DP.
        out = []
        for lo in range(0, len(coefs), dp_batch):
            chunk = coefs[lo : lo + dp_batch]
            pad = np.concatenate([chunk, np.repeat(chunk[-1:], dp_batch - len(chunk), axis=0)])
            costs = [[c[i] * errs[i] for i in range(num_layers)] for c in pad]
            out.append(np.asarray(dp.solve_batch(costs).choice, np.int64)[: len(chunk)])
        counts["candidates"] += len(coefs)
        return np.concatenate(out)

    def score(choice: np.ndarray) -> float:
        key = tuple(int(j) for j in choice)
        if key not in cache:
            s = float(score_fn(np.array(key, np.int64)))
            cache[key] = math.inf if math.isnan(s) else s
        return cache[key]

    def consider(coef: np.ndarray, choice: np.ndarray) -> bool:
        s = score(choice)
        improved = s < best["score"]
        if improved:
            best.update(score=s, choice=choice.copy(), coef=coef.copy())
        history.append(best["score"])
        return improved

    inits = rng.random((randinits, num_layers))
    if initial is not None:
        inits = np.concatenate([initial, inits])
    for coef, choice in zip(inits, solve(inits), strict=True):
        consider(coef, choice)
    if best["choice"] is None:  # every score was +inf: keep the first candidate
        best.update(choice=solve(inits[:1])[0], coef=inits[0].copy())
    if progress:
        print(f"[spdy] {len(inits)} initial vectors: best score {best['score']:.6f}", flush=True)

    for k in range(max(1, round(layerperc * num_layers)), 0, -1):
        failures = 0
        while failures < maxnoimp:
            coefs = np.repeat(best["coef"][None], min(dp_batch, maxnoimp - failures), axis=0)
            for row in coefs:
                row[rng.integers(0, num_layers, size=k)] = rng.random(k)
            for coef, choice in zip(coefs, solve(coefs), strict=True):
                if consider(coef, choice):
                    failures = 0
                    if progress:
                        print(f"[spdy] k={k}: score {best['score']:.6f}", flush=True)
                    break
                failures += 1
        if progress:
            print(f"[spdy] k={k} done after {len(history)} candidates", flush=True)

    return SearchResult(
        choice=np.asarray(best["choice"], np.int64),
        coefficients=np.asarray(best["coef"], np.float64),
        score=float(best["score"]),
        history=np.asarray(history, np.float64),
        evaluations=len(cache),
        candidates=counts["candidates"],
        seconds=time.perf_counter() - start,
    )
