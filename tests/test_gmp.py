"""Tests for gradual magnitude pruning (jaxcompress.optim._gmp): Zhu & Gupta's cubic schedule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _optim_loops import INNERS, run_steps

from jaxcompress.masks._magnitude import keep_count
from jaxcompress.optim._gmp import GmpState, gmp, gmp_sparsity


def _cubic(t, s_f, t0, t_end, every, s_i):
    """Zhu & Gupta (2017), eq. (1), at the last pruning step <= t; 0 before t0 (float64)."""
    if t < t0:
        return 0.0
    last = t0 + (min(t, t_end) - t0) // every * every
    return s_f + (s_i - s_f) * (1.0 - (last - t0) / (t_end - t0)) ** 3


@pytest.mark.parametrize("every", [1, 5])
def test_gmp_sparsity_follows_the_cubic(every):
    kw = dict(sparsity=0.9, begin_step=10, end_step=60, every=every, initial_sparsity=0.2)
    steps = np.arange(0, 80)
    got = np.asarray(jax.jit(lambda t: gmp_sparsity(t, **kw))(jnp.asarray(steps)))
    want = np.array([_cubic(int(t), 0.9, 10, 60, every, 0.2) for t in steps])
    np.testing.assert_allclose(got, want, atol=2e-7)
    assert got[9] == 0.0 and got[10] == np.float32(0.2) and got[60] == np.float32(0.9)
    assert np.all(np.diff(got[10:]) >= 0)  # monotone ramp
    if every == 5:
        assert np.all(got[10:15] == got[10]) and got[15] > got[14]  # held between pruning steps
    # Python ints are accepted too; a few hand-computed values (s_i = 0.2, s_f = 0.9).
    assert float(gmp_sparsity(35, **{**kw, "every": 1})) == pytest.approx(0.9 - 0.7 / 8, abs=1e-6)


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "a": {"kernel": jnp.asarray(rng.normal(size=(12, 10)), jnp.float32)},
        "b": {
            "kernel": jnp.asarray(rng.normal(size=(10, 6)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(6,)), jnp.float32),
        },
    }
    x = jnp.asarray(rng.normal(size=(32, 12)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)

    def loss(p):
        h = jnp.tanh(x @ p["a"]["kernel"])
        return jnp.mean((h @ p["b"]["kernel"] + p["b"]["bias"] - y) ** 2)

    return params, loss


def _kernels(tree):
    return [tree["a"]["kernel"], tree["b"]["kernel"]]


RAMP = dict(sparsity=0.8, begin_step=3, end_step=15, every=3, initial_sparsity=0.1)


@pytest.mark.parametrize("name", sorted(INNERS))
def test_monotone_masks_exact_counts_and_zeros(name):
    params, loss = _problem()
    traces = []
    tx = gmp(INNERS[name](), **RAMP)
    history = run_steps(tx, params, loss, 20, traces=traces)
    assert len(traces) == 1  # one compilation through the whole ramp
    n = 12 * 10 + 10 * 6
    pruning_steps = {3, 6, 9, 12, 15}
    for t in range(1, len(history)):
        p, state, _ = history[t]
        prev = history[t - 1][1]
        assert isinstance(state, GmpState) and int(state.count) == t
        masks, old = [np.asarray(m) for m in _kernels(state.masks)], _kernels(prev.masks)
        s_t = _cubic(t, 0.8, 3, 15, 3, 0.1)
        assert sum(int(m.sum()) for m in masks) == keep_count(n, s_t)
        for m, o in zip(masks, old, strict=True):
            assert not np.any(m & ~np.asarray(o))  # a pruned weight stays pruned
        changed = any(np.any(m != np.asarray(o)) for m, o in zip(masks, old, strict=True))
        assert changed == (t in pruning_steps)
        for w, m in zip(_kernels(p), masks, strict=True):
            assert np.all(np.asarray(w)[~m] == 0.0)  # exactly zero when step t runs
        assert bool(jnp.all(p["b"]["bias"] != 0.0))  # not selected: never pruned
    assert int(sum(m.sum() for m in _kernels(history[-1][1].masks))) == math.ceil(n * 0.2)


def test_layer_scope_counts_per_leaf():
    params, loss = _problem()
    tx = gmp(optax.sgd(0.05), **RAMP, scope="layer")
    state = run_steps(tx, params, loss, 16)[-1][1]
    assert [int(m.sum()) for m in _kernels(state.masks)] == [24, 12]


def test_begin_at_zero_prunes_in_init():
    params, loss = _problem()
    tx = gmp(optax.sgd(0.05), sparsity=0.5, begin_step=0, end_step=4, every=2, initial_sparsity=0.3)
    history = run_steps(tx, params, loss, 1)
    masks = _kernels(history[0][1].masks)
    assert sum(int(m.sum()) for m in masks) == keep_count(180, 0.3)
    for w, m in zip(_kernels(history[1][0]), masks, strict=True):
        assert np.all(np.asarray(w)[~np.asarray(m)] == 0.0)


def test_kept_weight_at_exactly_zero_is_preferred_to_a_pruned_one():
    # Step 1's mask prunes the smallest |w| (position 0). Then the kept weight at position 7
    # is driven to exactly 0; step 2's mask (same sparsity) must keep it, not revive
    # position 0, although position 0 comes first in the tie order of equal magnitudes.
    params = {"k": {"kernel": jnp.asarray([[0.01, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]])}}
    tx = gmp(optax.sgd(1.0), sparsity=0.125, begin_step=1, end_step=2, every=1,
             initial_sparsity=0.125)  # fmt: skip
    state = tx.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, state = tx.update(zero, state, params)
    params = optax.apply_updates(params, updates)
    first = np.asarray(state.masks["k"]["kernel"]).ravel()
    assert not first[0] and first[1:].all() and params["k"]["kernel"][0, 0] == 0.0
    only_k = {"k": {"kernel": jnp.zeros((2, 4)).at[1, 3].set(7.0)}}
    updates, state = tx.update(only_k, state, params)
    params = optax.apply_updates(params, updates)
    assert params["k"]["kernel"][1, 3] == 0.0
    second = np.asarray(state.masks["k"]["kernel"]).ravel()
    np.testing.assert_array_equal(second, first)  # 7 kept, position 0 stays pruned


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(sparsity=1.0), ValueError, "sparsity"),
        (dict(initial_sparsity=0.9), ValueError, "initial_sparsity"),
        (dict(end_step=3), ValueError, "end_step"),
        (dict(every=5), ValueError, "every"),
        (dict(every=0), ValueError, "every"),
        (dict(begin_step=-1), ValueError, "begin_step"),
        (dict(begin_step=3.0), TypeError, "begin_step"),
        (dict(scope="nm"), ValueError, "scope"),
        (dict(where=None), TypeError, "where"),
    ],
)
def test_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        gmp(optax.sgd(0.1), **{**RAMP, **kwargs})
    if "scope" not in kwargs and "where" not in kwargs:
        ramp = {k: v for k, v in {**RAMP, **kwargs}.items()}
        with pytest.raises(error, match=match):
            gmp_sparsity(0, **ramp)


def test_update_needs_params_and_inner_must_be_a_transformation():
    params, _ = _problem()
    tx = gmp(optax.sgd(0.1), **RAMP)
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))
    with pytest.raises(TypeError, match="inner"):
        gmp("sgd", **RAMP)
