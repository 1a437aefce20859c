"""SPDY DP: parity with the NumPy oracle, reference fixtures, brute force, edge cases."""

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import count_compiles
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spdy_oracle import bucketize as oracle_bucketize
from spdy_oracle import oracle_dp, oracle_solve

from jaxcompress import spdy
from jaxcompress.spdy import _dp

DATA = os.environ.get("JAXCOMPRESS_DATA_DIR", "")
TIMINGS = os.path.join(DATA, "spdy_timings")
needs_data = pytest.mark.skipif(not os.path.isdir(TIMINGS), reason="SPDY timing tables missing")
FIRSTLAST = ("conv1", "fc")


def _as_lists(costs):
    return [np.asarray(c, np.float64).tolist() for c in costs]


def _assert_matches_oracle(sol, ref):
    choice, cost, used = ref
    assert bool(sol.feasible)
    assert np.asarray(sol.choice).tolist() == choice
    assert float(sol.cost) == cost
    assert int(sol.buckets_used) == used


# ---- reference fixtures (algorithms.md section 3.2) ------------------------------------

FIXTURES = [
    ("rn18_unstr", 1.5, 19, 0.239143, 9999, 11, 0.252),
    ("rn18_unstr", 2.0, 19, 0.784652, 9999, 8, 0.427),
    ("rn18_unstr", 2.5, 19, 1.676383, 9999, 3, 0.671),
    ("rn18_unstr", 3.0, 19, 2.462225, 9999, 1, 0.784),
    ("rn50_unstr", 1.5, 52, 0.750149, 9999, 12, 0.445),
    ("rn50_unstr", 2.0, 52, 2.588340, 10000, 6, 0.633),
    ("rn50_unstr", 2.5, 52, 5.336704, 10000, 0, 0.787),
    ("rn50_unstr", 3.0, 52, 8.885187, 10000, 0, 0.835),
    ("rn34_unstr", 2.0, 35, 2.4503, None, None, None),
    ("rn101_unstr", 2.0, 103, 5.3058, None, None, None),
    ("2rn50_unstr", 2.0, 52, 2.8346, None, None, None),
]


def _reference_problem(name, target):
    table = spdy.TimingTable.load(os.path.join(TIMINGS, f"{name}.txt"))
    kept = table.drop(FIRSTLAST)
    t = spdy.budget(table, target, skip=FIRSTLAST, reference_budget=True)
    return kept, spdy.prior_errors(kept), t


@needs_data
@pytest.mark.parametrize("name,target,num_layers,cost,used,dense,mean_sparsity", FIXTURES)
def test_reference_fixtures(name, target, num_layers, cost, used, dense, mean_sparsity):
    kept, errors, t = _reference_problem(name, target)
    assert len(kept) == num_layers
    sol = spdy.solve(errors, kept.times(), t)
    _assert_matches_oracle(sol, oracle_solve(_as_lists(errors), kept.times(), t))
    digits = len(f"{cost}".split(".")[1])
    assert round(float(sol.cost), digits) == cost
    levels = [float(x) for x in kept.profile(sol.choice).values()]
    if used is not None:
        assert int(sol.buckets_used) == used
        assert sum(x == 0 for x in levels) == dense
        assert round(float(np.mean(levels)), 3) == mean_sparsity


@needs_data
def test_rn18_profile_at_2x():
    kept, errors, t = _reference_problem("rn18_unstr", 2.0)
    sol = spdy.solve(errors, kept.times(), t)
    expected = [0, 0, 0, 0, 0.7069, 0, 0.4584, 0, 0, 0.7612, 0.7612, 0.5111, 0.7612, 0.8054,
                0.7844, 0.8414, 0, 0.8568, 0.8708]  # fmt: skip
    assert [float(x) for x in kept.profile(sol.choice).values()] == expected
    assert list(kept.names)[:2] == ["layer1.0.conv1", "layer1.0.conv2"]


@needs_data
def test_random_coefficients_match_oracle_on_rn50():
    kept, errors, t = _reference_problem("rn50_unstr", 2.0)
    rng = np.random.default_rng(1)
    coefs = rng.uniform(size=(4, len(kept)))
    costs = np.stack([np.stack(errors) * c[:, None] for c in coefs])
    batch = spdy.solve_batch(costs, np.stack(kept.times()), t)
    for i in range(4):
        ref = oracle_solve(costs[i].tolist(), kept.times(), t)
        _assert_matches_oracle(jax.tree.map(lambda x, i=i: x[i], batch), ref)


# ---- random ragged tables against the oracle -------------------------------------------

S_PAD = 5


@st.composite
def ragged_problems(draw):
    num_layers = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(1, S_PAD), min_size=num_layers, max_size=num_layers))
    buckets = draw(st.sampled_from([7, 20, 63]))
    # small integer-ish times and costs make ties and exact-fit budgets common
    times = np.zeros((num_layers, S_PAD))
    costs = np.zeros((num_layers, S_PAD))
    for i, n in enumerate(lengths):
        times[i, :n] = draw(st.lists(st.integers(0, 12), min_size=n, max_size=n))
        costs[i, :n] = draw(
            st.lists(
                st.one_of(
                    st.integers(0, 4).map(float),
                    # XLA's CPU backend flushes subnormals to zero (see _dp's docstring)
                    st.floats(0, 3, width=32, allow_subnormal=False),
                ),
                min_size=n,
                max_size=n,
            )
        )
    fastest = sum(times[i, :n].min() for i, n in enumerate(lengths))
    slack = draw(st.sampled_from([0.0, 0.5, 1.0, 3.0, 10.0]))
    budget_value = max(fastest + slack, 1.0)
    return costs, times, np.array(lengths), budget_value, buckets


def _ragged(a, lengths):
    return [a[i, :n] for i, n in enumerate(lengths)]


def over_problems(max_examples):
    """A hypothesis test ``test(padded, ragged)`` over :func:`ragged_problems`: ``padded`` is
    ``(costs, times, lengths, budget, buckets)``, ``ragged`` is ``(costs, times)`` as lists of
    rows."""

    def wrap(test):
        def run(problem):
            costs, times, lengths, _, _ = problem
            return test(problem, (_ragged(costs, lengths), _ragged(times, lengths)))

        run.__name__ = test.__name__
        strategy = given(ragged_problems())(run)
        return settings(
            max_examples=max_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow]
        )(strategy)

    return wrap


def _unless_infeasible(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or None when the budget is infeasible."""
    try:
        return fn(*args, **kwargs)
    except spdy.InfeasibleBudgetError:
        return None


@over_problems(40)
def test_matches_oracle_float64(problem, ragged):
    costs, times, lengths, budget_value, buckets = problem
    rc, rt = ragged
    try:
        sol = spdy.solve(costs, times, budget_value, buckets=buckets, lengths=lengths)
    except spdy.InfeasibleBudgetError:
        ref = oracle_solve(_as_lists(rc), rt, budget_value, buckets)
        assert ref[0] == [-1] * len(lengths)  # the reference returns -1s here
        return
    _assert_matches_oracle(sol, oracle_solve(_as_lists(rc), rt, budget_value, buckets))
    # the ragged-list API gives the same answer as the padded one
    sol2 = spdy.solve(rc, rt, budget_value, buckets=buckets)
    assert np.array_equal(sol2.choice, sol.choice) and float(sol2.cost) == float(sol.cost)
    # NumPy rows take a fast host path; Python lists the general one
    sol3 = spdy.solve(_as_lists(rc), rt, budget_value, buckets=buckets)
    assert np.array_equal(sol3.choice, sol.choice) and float(sol3.cost) == float(sol.cost)


def _solve_with_kernel(prep, costs, kernel, dtype=np.float64):
    """One solve through the jitted kernel with an explicit per-layer step."""
    with jax.enable_x64(True):
        c = _dp._pad_costs(costs, prep._plan, np.dtype(dtype), batched=False)
        return _dp._solve_jit(c, *prep._args(np.dtype(dtype)), width=prep.width, kernel=kernel)


@over_problems(30)
def test_gather_kernel_equals_loop_kernel_and_oracle(problem, ragged):
    # "auto" runs the loop on CPU and the gather elsewhere: both must be the reference.
    _, _, _, budget_value, buckets = problem
    rc, rt = ragged
    prep = _unless_infeasible(_dp.prepare, rt, budget_value, buckets=buckets)
    if prep is None:
        return
    ref = oracle_solve(_as_lists(rc), rt, budget_value, buckets)
    for kernel in ("loop", "gather"):
        _assert_matches_oracle(_solve_with_kernel(prep, rc, kernel), ref)
    ref32 = oracle_solve(_as_lists(rc), rt, budget_value, buckets, np.float32)
    _assert_matches_oracle(_solve_with_kernel(prep, rc, "gather", np.float32), ref32)


@needs_data
def test_gather_kernel_batch_matches_oracle_on_rn50():
    kept, errors, t = _reference_problem("rn50_unstr", 2.5)
    prep = _dp.prepare(kept.times(), t)
    rng = np.random.default_rng(2)
    coefs = rng.uniform(size=(3, len(kept)))
    costs = [[e * c for e, c in zip(errors, coef, strict=True)] for coef in coefs]
    with jax.enable_x64(True):
        padded = _dp._pad_costs(costs, prep._plan, np.dtype(np.float64), batched=True)
        out = _dp._solve_batch_jit(
            padded, *prep._args(np.dtype(np.float64)), width=prep.width, batch_size=None,
            kernel="gather",
        )  # fmt: skip
    for i in range(3):
        ref = oracle_solve(_as_lists(costs[i]), kept.times(), t)
        _assert_matches_oracle(jax.tree.map(lambda x, i=i: x[i], out), ref)


@over_problems(25)
def test_float32_matches_float32_oracle_and_is_near_optimal(problem, ragged):
    _, _, _, budget_value, buckets = problem
    rc, rt = ragged
    sol = _unless_infeasible(spdy.solve, rc, rt, budget_value, buckets=buckets, dtype=np.float32)
    if sol is None:
        return
    assert sol.cost.dtype == np.float32
    _assert_matches_oracle(sol, oracle_solve(_as_lists(rc), rt, budget_value, buckets, np.float32))
    # documented tolerance against the float64 optimum
    exact = spdy.solve(rc, rt, budget_value, buckets=buckets)
    tol = len(rc) * np.finfo(np.float32).eps * sum(np.abs(c).max() for c in rc)
    assert abs(float(sol.cost) - float(exact.cost)) <= tol


# ---- brute force ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_brute_force_small(seed):
    """The optimum over all profiles whose *bucketised* time fits (the DP's feasibility
    notion: a profile with sum t <= T can be rejected, or one with sum t > T accepted,
    by rounding)."""
    rng = np.random.default_rng(seed)
    num_layers, buckets = 3, 50
    lengths = rng.integers(1, 5, size=num_layers)
    times = [rng.uniform(0, 1, size=n) for n in lengths]
    costs = [rng.uniform(0, 1, size=n) * rng.integers(1, 3) for n in lengths]
    budget_value = float(sum(t.min() for t in times) + rng.uniform(0.05, 1.5))
    kb = oracle_bucketize(times, budget_value, buckets)
    best = (np.inf, None)
    for profile in itertools.product(*[range(n) for n in lengths]):
        if sum(kb[i][j] for i, j in enumerate(profile)) <= buckets:
            total = 0.0
            for i, j in enumerate(profile):
                total += costs[i][j]  # layer order, as the DP accumulates
            best = min(best, (total, profile), key=lambda x: x[0])
    if best[1] is None:
        with pytest.raises(spdy.InfeasibleBudgetError):
            spdy.solve(costs, times, budget_value, buckets=buckets)
        return
    sol = spdy.solve(costs, times, budget_value, buckets=buckets)
    choice = np.asarray(sol.choice).tolist()
    assert float(sol.cost) == best[0]
    assert sum(kb[i][j] for i, j in enumerate(choice)) == int(sol.buckets_used) <= buckets
    assert float(sol.time) == pytest.approx(sum(times[i][j] for i, j in enumerate(choice)))


# ---- budgets at the edge ------------------------------------------------------------


def test_infeasible_budget_raises_before_work():
    times = [np.array([5.0, 3.0]), np.array([4.0, 2.0])]
    costs = [np.array([0.0, 1.0]), np.array([0.0, 1.0])]
    with pytest.raises(spdy.InfeasibleBudgetError, match="fastest profile takes 5.0"):
        spdy.solve(costs, times, 4.9, buckets=100)
    with pytest.raises(spdy.InfeasibleBudgetError):
        spdy.solve_batch([costs, costs], times, 4.9, buckets=100)


def test_exactly_feasible_budget_picks_the_only_fitting_profile():
    times = [np.array([5.0, 3.0]), np.array([4.0, 2.0])]
    costs = [np.array([0.0, 1.0]), np.array([0.0, 1.0])]
    sol = spdy.solve(costs, times, 5.0, buckets=100)
    assert np.asarray(sol.choice).tolist() == [1, 1]
    assert int(sol.buckets_used) == 100 and float(sol.cost) == 2.0 and float(sol.time) == 5.0
    # one more unit of budget lets the cheaper layer-1 dense option in
    sol = spdy.solve(costs, times, 7.0, buckets=700)
    assert np.asarray(sol.choice).tolist() == [1, 0] and float(sol.cost) == 1.0


def test_ties_keep_lowest_option_and_fewest_buckets():
    times = [np.array([1.0, 1.0, 0.0]), np.array([0.0, 1.0])]
    costs = [np.array([2.0, 2.0, 2.0]), np.array([1.0, 1.0])]
    sol = spdy.solve(costs, times, 2.0, buckets=2)
    ref = oracle_solve(_as_lists(costs), times, 2.0, 2)
    _assert_matches_oracle(sol, ref)
    assert int(sol.buckets_used) == 0  # first argmin of the last row


def test_all_options_forbidden_is_reported_not_minus_ones():
    times = [np.array([1.0, 0.5]), np.array([1.0, 0.5])]
    costs = [np.array([np.inf, np.inf]), np.array([0.0, 1.0])]
    sol = spdy.solve(costs, times, 3.0, buckets=30)
    assert not bool(sol.feasible) and int(sol.buckets_used) == -1
    assert float(sol.cost) == np.inf


# ---- compilation, batching, tracing -------------------------------------------------


def test_no_recompilation_on_second_call_and_new_costs():
    times = np.array([[1.0, 0.5, 0.2], [2.0, 1.0, 0.1]])
    rng = np.random.default_rng(0)
    spdy.solve(rng.uniform(size=(2, 3)), times, 2.0, buckets=100)
    costs = [rng.uniform(size=(2, 3)) for _ in range(4)]
    with count_compiles() as counter:
        for c in costs[:3]:
            spdy.solve(c, times, 2.0, buckets=100)
        spdy.solve(costs[3], times * 1.01, 2.0, buckets=100)  # new table, same shape
    assert counter.compiles == 0


def test_solve_batch_equals_single_solves_for_every_batch_size():
    rng = np.random.default_rng(3)
    lengths = np.array([3, 1, 4])
    times = rng.uniform(0.1, 1.0, size=(3, 4))
    costs = rng.uniform(size=(5, 3, 4))
    singles = [spdy.solve(c, times, 1.6, buckets=200, lengths=lengths) for c in costs]
    for batch_size in (1, 3, None, "auto"):
        out = spdy.solve_batch(costs, times, 1.6, buckets=200, lengths=lengths,
                               batch_size=batch_size)  # fmt: skip
        assert out.choice.shape == (5, 3)
        for i, s in enumerate(singles):
            assert np.array_equal(out.choice[i], s.choice)
            assert float(out.cost[i]) == float(s.cost)


def test_solve_batch_rejects_bad_batch_size():
    for bad in (0, -1, True, "all", 1.5):
        with pytest.raises(ValueError, match="batch_size must be a positive int, None or 'auto'"):
            spdy.solve_batch(np.ones((2, 1, 2)), np.array([[1.0, 0.5]]), 1.0, batch_size=bad)


def test_vmap_and_jit_over_costs():
    rng = np.random.default_rng(4)
    times = rng.uniform(0.1, 1.0, size=(4, 3))
    costs = rng.uniform(size=(6, 4, 3)).astype(np.float32)
    fn = jax.jit(jax.vmap(lambda c: spdy.solve(c, times, 2.0, buckets=300, dtype=jnp.float32)))
    out = fn(costs)
    for i in range(6):
        ref = oracle_solve(costs[i].tolist(), times.tolist(), 2.0, 300, np.float32)
        assert np.asarray(out.choice[i]).tolist() == ref[0]
        assert float(out.cost[i]) == ref[1]
    with pytest.raises(TypeError, match="enable_x64"):
        jax.vmap(lambda c: spdy.solve(c, times, 2.0, buckets=300))(costs)
    with jax.enable_x64(True):
        out64 = jax.vmap(lambda c: spdy.solve(c, times, 2.0, buckets=300))(costs.astype(np.float64))
        assert out64.cost.dtype == np.float64


def test_does_not_flip_global_x64():
    spdy.solve([np.array([1.0])], [np.array([1.0])], 2.0)
    assert not jax.config.jax_enable_x64
    assert jnp.zeros(1).dtype == jnp.float32


# ---- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(times=[np.array([1.0, -1.0])]), ValueError, "negative"),
        (dict(times=[np.array([1.0, np.nan])]), ValueError, "non-finite"),
        (dict(times=[np.array([])]), ValueError, "empty"),
        (dict(times=[]), ValueError, "no layers"),
        (dict(times=[np.array([1.0, 2.0, 3.0])]), ValueError, "layer by layer"),
        (dict(costs=[np.array([np.nan, 1.0])]), ValueError, "NaN"),
        (dict(budget=0.0), ValueError, "budget"),
        (dict(budget=float("inf")), ValueError, "budget"),
        (dict(buckets=0), ValueError, "buckets"),
        (dict(buckets=2.5), ValueError, "buckets"),
        (dict(dtype=np.int32), TypeError, "dtype"),
        (dict(times=np.ones((1, 2, 1))), ValueError, "2-D"),
        (dict(costs=np.ones((2, 2)), times=np.ones((1, 2))), ValueError, "shape"),
        (dict(costs=np.ones((1, 2)), times=np.ones((1, 2)), lengths=[3]), ValueError, "lengths"),
        (dict(times="abc"), TypeError, "sequence"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = dict(costs=[np.array([0.0, 1.0])], times=[np.array([1.0, 0.5])], budget=2.0)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        spdy.solve(args.pop("costs"), args.pop("times"), args.pop("budget"), **args)


def test_oracle_helper_consistency():
    # the oracle reproduces the reference's -1 profile on an infeasible budget
    assert oracle_dp([[1.0]], [[5]], 3) == ([-1], float("inf"), -1)


def test_row_prefixes_cover_reach_and_match_oracle():
    # Early rows can only be finite on a short prefix; they are computed on a shorter span.
    rng = np.random.default_rng(11)
    scales, counts = [0.05, 0.1, 0.3, 1.0, 2.0], [3, 5, 2, 6, 4]
    times = [rng.uniform(0.0, s, size=n) for s, n in zip(scales, counts, strict=True)]
    costs = [rng.uniform(size=t.shape[0]) for t in times]
    budget = float(sum(t.max() for t in times)) * 0.6
    prep = spdy.prepare(times, budget, buckets=4000)
    plan = prep._plan
    spans = _dp._spans(plan.width)
    assert len(set(plan.span.tolist())) > 1  # several compiled prefixes are exercised
    for layer, k in enumerate(plan.span.tolist()):
        top = sum(
            int(plan.slot_shift[i][plan.slot_shift[i] < plan.valid_width].max())
            for i in range(layer + 1)
        )
        assert spans[k] >= min(top, plan.valid_width - 1) + 1
    ref = oracle_solve([c.tolist() for c in costs], [t.tolist() for t in times], budget, 4000)
    _assert_matches_oracle(spdy.solve(costs, times, budget, buckets=4000), ref)


def test_threaded_batch_matches_oracle_inside_caller_x64_context():
    # A concrete CPU batch is split over host threads; each chunk must keep the caller's
    # (thread-local) float64 mode and the result must equal the oracle solve by solve.
    rng = np.random.default_rng(12)
    times = rng.uniform(0.1, 1.0, size=(4, 3))
    costs = rng.uniform(size=(7, 4, 3))
    if jax.default_backend() == "cpu":
        assert _dp._num_workers(costs, 1) == min(7, os.cpu_count() or 1, _dp._MAX_WORKERS)
    assert _dp._num_workers(costs, None) == 1
    with jax.enable_x64(True):
        out = spdy.solve_batch(costs, times, 2.0, buckets=300)
    assert out.cost.dtype == np.float64 and out.choice.shape == (7, 4)
    for i in range(7):
        ref = oracle_solve(costs[i].tolist(), times.tolist(), 2.0, 300)
        _assert_matches_oracle(jax.tree.map(lambda x, i=i: x[i], out), ref)
