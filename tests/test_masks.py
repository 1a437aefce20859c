"""Tests for jaxcompress.masks: selection, magnitude, N:M, ERK, apply, summary, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxcompress.masks as jm

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- oracles


def _np_keys(x):
    return np.abs(np.asarray(x, np.float32)).view(np.int32)


def oracle_topk(arrays, k):
    """Keep k entries: |w| descending, then (leaf order, flat index) ascending."""
    keys = np.concatenate([_np_keys(a).ravel() for a in arrays])
    order = np.lexsort((np.arange(keys.size), -keys.astype(np.int64)))
    keep = np.zeros(keys.size, bool)
    keep[order[:k]] = True
    out, start = [], 0
    for a in arrays:
        out.append(keep[start : start + a.size].reshape(a.shape))
        start += a.size
    return out


def oracle_reference(arrays, k):
    """The reference rule: thr = k-th largest |w|, keep |w| > thr (strict)."""
    keys = np.concatenate([_np_keys(a).ravel() for a in arrays])
    if k == 0:
        return [np.zeros(a.shape, bool) for a in arrays]
    thr = np.sort(keys)[::-1][k - 1]
    return [_np_keys(a) > thr for a in arrays]


def random_params(rng, shapes, dtype=np.float32, round_to=None):
    params = {}
    for i, shape in enumerate(shapes):
        w = rng.normal(size=shape)
        if round_to is not None:
            w = np.round(w, round_to)  # creates ties
        params[f"layer{i}"] = {"kernel": jnp.asarray(w, dtype), "bias": jnp.zeros(shape[-1], dtype)}
    return params


def kernels(tree):
    return [tree[k]["kernel"] for k in sorted(tree)]


# Shapes come from a small pool so that compiled programs are reused across examples
# (each new shape signature costs an XLA compile on a 2-core CI machine).
SHAPE_POOL = [(1, 1), (3, 7), (8, 12), (5, 1), (2, 3, 4, 6), (1, 1, 3, 2)]
shapes_st = st.lists(st.sampled_from(SHAPE_POOL), min_size=1, max_size=3)
sparsity_st = st.floats(0.0, 0.999, allow_nan=False, exclude_max=False)


# ----------------------------------------------------------------------------- selection


def test_prunable_default_selection():
    params = {
        "conv1": {"kernel": jnp.ones((3, 3, 3, 8)), "bias": jnp.ones(8)},
        "bn": {"scale": jnp.ones((8,)), "bias": jnp.ones(8)},
        "emb": {"embedding": jnp.ones((10, 4))},
        "fc": {"weight": jnp.ones((4, 2)), "w": jnp.ones((2, 2))},
        "int": {"kernel": jnp.ones((2, 2), jnp.int32)},
        "vec": {"kernel": jnp.ones((4,))},
    }
    picked = {
        jm.path_str(p)
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
        if jm.prunable(p, x)
    }
    assert picked == {"conv1/kernel", "fc/weight", "fc/w"}


def test_nnx_state_paths_and_masks():
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(4, 8, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(8, rngs=rngs)
            self.emb = nnx.Embed(10, 8, rngs=rngs)
            self.fc = nnx.Linear(8, 4, rngs=rngs)

    state = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
    paths = [
        jm.path_str(p)
        for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
        if jm.prunable(p, x)
    ]
    assert paths == ["conv/kernel", "fc/kernel"]
    masks = jm.magnitude(state, 0.5)
    jm.validate_masks(state, masks)
    summ = jm.summary(masks)
    assert [r.path for r in summ.rows] == ["conv/kernel", "fc/kernel"]
    assert summ.total_zeros == summ.total_count - jm.keep_count(summ.total_count, 0.5)
    pruned = jm.apply(state, masks)
    assert jm.summary(pruned).total_zeros >= summ.total_zeros
    nm_masks = jm.nm(state, 2, 4)
    assert jm.summary(nm_masks).sparsity == 0.5


def test_select_and_exclude_first_last():
    params = random_params(np.random.default_rng(0), [(4, 4)] * 3)
    sel = jm.select(exclude=r"^layer1/")
    masks = jm.magnitude(params, 0.5, where=sel)
    assert masks["layer1"]["kernel"] is None and masks["layer0"]["kernel"] is not None
    sel = jm.select(include=["layer0", "layer2"], exclude="layer2")
    masks = jm.magnitude(params, 0.5, where=sel)
    assert [m["kernel"] is None for m in (masks[f"layer{i}"] for i in range(3))] == [
        False,
        True,
        True,
    ]
    mid = jm.exclude_first_last(params)
    masks = jm.magnitude(params, 0.5, where=mid, scope="layer")
    assert masks["layer0"]["kernel"] is None and masks["layer2"]["kernel"] is None
    assert int(masks["layer1"]["kernel"].sum()) == 8
    with pytest.raises(ValueError, match="include"):
        jm.select(include="(")


# ----------------------------------------------------------------------------- magnitude


@SETTINGS
@given(shapes=shapes_st, sparsity=sparsity_st, seed=st.integers(0, 2**16), ties=st.booleans())
def test_magnitude_exact_counts_match_oracle(shapes, sparsity, seed, ties):
    params = random_params(np.random.default_rng(seed), shapes, round_to=0 if ties else None)
    ks = [np.asarray(k) for k in kernels(params)]
    sizes = [k.size for k in ks]
    g = jm.magnitude(params, sparsity, scope="global")
    g_masks = [np.asarray(m) for m in kernels(g)]
    assert sum(int(m.sum()) for m in g_masks) == jm.keep_count(sum(sizes), sparsity)
    for got, want in zip(
        g_masks, oracle_topk(ks, jm.keep_count(sum(sizes), sparsity)), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    lay = jm.magnitude(params, sparsity, scope="layer")
    for m, k in zip(kernels(lay), ks, strict=True):
        assert int(m.sum()) == jm.keep_count(k.size, sparsity)
        np.testing.assert_array_equal(
            np.asarray(m), oracle_topk([k], jm.keep_count(k.size, sparsity))[0]
        )
    assert all(lay[k]["bias"] is None and g[k]["bias"] is None for k in params)


@SETTINGS
@given(shapes=shapes_st, sparsity=sparsity_st, seed=st.integers(0, 2**16))
def test_reference_ties_matches_numpy_oracle(shapes, sparsity, seed):
    params = random_params(np.random.default_rng(seed), shapes, round_to=1)
    ks = [np.asarray(k) for k in kernels(params)]
    n = sum(k.size for k in ks)
    got = jm.magnitude(params, sparsity, reference_ties=True)
    for m, want in zip(kernels(got), oracle_reference(ks, jm.keep_count(n, sparsity)), strict=True):
        np.testing.assert_array_equal(np.asarray(m), want)


def test_reference_ties_keeps_one_less_without_ties():
    w = jnp.arange(1.0, 11.0).reshape(2, 5)
    m = jm.magnitude({"kernel": w}, 0.5, reference_ties=True)["kernel"]
    assert int(m.sum()) == 4  # k_keep = 5, strict threshold drops the 5th
    m = jm.magnitude({"kernel": w}, 0.5)["kernel"]
    np.testing.assert_array_equal(np.asarray(m).ravel(), np.arange(10) >= 5)


def test_all_equal_weights_exact_count_and_tie_order():
    params = {"a": {"kernel": jnp.ones((4, 5))}, "b": {"kernel": -jnp.ones((3, 3))}}
    g = jm.magnitude(params, 0.6)
    # k_keep = ceil(29 * 0.4) = 12: all ties, so leaf 'a' (first in flatten order) wins.
    assert int(g["a"]["kernel"].sum()) == 12 and int(g["b"]["kernel"].sum()) == 0
    np.testing.assert_array_equal(np.asarray(g["a"]["kernel"]).ravel(), np.arange(20) < 12)
    lay = jm.magnitude(params, 0.6, scope="layer")
    assert int(lay["a"]["kernel"].sum()) == 8 and int(lay["b"]["kernel"].sum()) == 4
    ref = jm.magnitude(params, 0.6, reference_ties=True)
    assert sum(int(m.sum()) for m in jax.tree.leaves(ref)) == 0


def test_keep_count_decimal_sparsities():
    assert jm.keep_count(10, 0.7) == 3
    assert jm.keep_count(10, 0.9) == 1
    assert jm.keep_count(1000, 0.999) == 1
    assert jm.keep_count(7, 0.5) == 4
    assert jm.keep_count(5, 0.0) == 5


def test_device_keep_count_matches_python_rule():
    from jaxcompress.masks._magnitude import keep_count_array

    def device(n, s):
        return int(keep_count_array(n, jnp.float32(s)))

    for n in (1, 7, 10, 1000, 12345, 2**18):
        for s in (0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 0.95, 0.99):
            assert device(n, s) == jm.keep_count(n, s), (n, s)
    for n in (1, 10, 999, 12345):
        for s in (0.001, 0.125, 0.333, 0.995, 0.999):
            assert device(n, s) == jm.keep_count(n, s), (n, s)
    n = 25_502_912  # large N: off by at most the float32 resolution of s
    for s in (0.5, 0.7, 0.9, 0.98):
        assert abs(device(n, s) - jm.keep_count(n, s)) <= 2, s


def test_traced_sparsity_no_recompile_and_counts():
    params = random_params(np.random.default_rng(1), [(64, 32), (3, 3, 16, 8)])
    n = 64 * 32 + 3 * 3 * 16 * 8
    traces = []

    @jax.jit
    def both(p, s):
        traces.append(1)
        return jm.magnitude(p, s, scope="global"), jm.magnitude(p, s, scope="layer")

    for s in (0.5, 0.7, 0.9, 0.95, 0.0):
        g, lay = both(params, jnp.float32(s))
        assert sum(int(m.sum()) for m in jax.tree.leaves(g)) == jm.keep_count(n, s)
        for m, k in zip(kernels(lay), kernels(params), strict=True):
            assert int(m.sum()) == jm.keep_count(k.size, s)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(jm.magnitude(params, s)), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(traces) == 1


def test_per_leaf_sparsity_tree_and_erk():
    params = random_params(np.random.default_rng(2), [(3, 3, 3, 16), (3, 3, 16, 32), (512, 10)])
    sp = jm.erk(params, 0.9)
    assert all(sp[k]["bias"] is None for k in params)
    sizes = [k.size for k in kernels(params)]
    dens = [1 - sp[k]["kernel"] for k in sorted(params)]
    np.testing.assert_allclose(np.dot(dens, sizes), 0.1 * sum(sizes), rtol=1e-12)
    assert dens[0] > dens[1]  # small stem conv is denser
    masks = jm.magnitude(params, sp, scope="layer")
    for m, k in zip(kernels(masks), sorted(params), strict=True):
        assert int(m.sum()) == jm.keep_count(m.size, sp[k]["kernel"])
    kept = sum(int(m.sum()) for m in kernels(masks))
    assert abs(kept - 0.1 * sum(sizes)) <= len(sizes)
    sp["layer1"]["kernel"] = None
    assert jm.magnitude(params, sp, scope="layer")["layer1"]["kernel"] is None
    uniform = jm.erk(params, 0.8, power_scale=0.0)
    np.testing.assert_allclose([uniform[k]["kernel"] for k in sorted(params)], 0.8)


def test_erk_caps_dense_layers():
    params = {"tiny": {"kernel": jnp.ones((2, 2))}, "big": {"kernel": jnp.ones((256, 256))}}
    sp = jm.erk(params, 0.5)
    assert sp["tiny"]["kernel"] == 0.0
    total = 4 + 256 * 256
    np.testing.assert_allclose(4 + (1 - sp["big"]["kernel"]) * 256 * 256, 0.5 * total)


# ----------------------------------------------------------------------------- N:M


@SETTINGS
@given(
    nm_=st.sampled_from([(2, 4), (1, 4), (4, 8), (1, 2), (3, 4), (20, 40)]),
    groups=st.integers(1, 3),
    lead=st.lists(st.integers(1, 3), max_size=2),
    out=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_nm_valid_on_random_shapes(nm_, groups, lead, out, seed, ties):
    n, m = nm_
    shape = (*lead, groups * m, out)
    w = np.random.default_rng(seed).normal(size=shape)
    if ties:
        w = np.round(w)
    mask = np.asarray(jm.nm({"kernel": jnp.asarray(w, jnp.float32)}, n, m)["kernel"])
    assert mask.shape == shape
    g = np.moveaxis(mask, -2, -1).reshape(-1, m)
    assert (g.sum(-1) == n).all()
    keys = np.moveaxis(_np_keys(w), -2, -1).reshape(-1, m)
    for row, kept in zip(keys, g, strict=True):
        order = np.lexsort((np.arange(m), -row.astype(np.int64)))
        np.testing.assert_array_equal(np.sort(np.flatnonzero(kept)), np.sort(order[:n]))


def test_nm_groups_along_contracting_axis():
    w = jnp.asarray([[1.0, 4.0], [2.0, 3.0], [3.0, 2.0], [4.0, 1.0]])  # (in=4, out=2)
    mask = np.asarray(jm.nm({"kernel": w}, 2, 4)["kernel"])
    np.testing.assert_array_equal(
        mask, [[False, True], [False, True], [True, False], [True, False]]
    )
    ties = np.asarray(jm.nm({"kernel": jnp.ones((8, 1))}, 2, 4)["kernel"]).ravel()
    np.testing.assert_array_equal(ties, [1, 1, 0, 0, 1, 1, 0, 0])


# ----------------------------------------------------------------------------- apply, summary


def test_apply_map_masked_and_dtype():
    params = random_params(np.random.default_rng(3), [(8, 8)], dtype=jnp.bfloat16)
    params["layer0"]["kernel"] = params["layer0"]["kernel"].at[0, 0].set(jnp.inf)
    masks = jm.magnitude(params, 0.75, scope="layer")
    masks["layer0"]["kernel"] = masks["layer0"]["kernel"].at[0, 0].set(False)
    out = jm.apply(params, masks)
    k = out["layer0"]["kernel"]
    assert k.dtype == jnp.bfloat16 and float(k[0, 0]) == 0.0
    assert int(jnp.sum(k != 0)) == int(masks["layer0"]["kernel"].sum())
    assert out["layer0"]["bias"] is params["layer0"]["bias"]
    doubled = jm.map_masked(lambda w, m: w * 2, params, masks)
    assert doubled["layer0"]["bias"] is params["layer0"]["bias"]
    assert jnp.array_equal(doubled["layer0"]["kernel"], params["layer0"]["kernel"] * 2)


def test_summary_params_and_masks():
    params = {"a": {"kernel": jnp.asarray([[0.0, 1.0], [2.0, 0.0]]), "bias": jnp.zeros(2)}}
    s = jm.summary(params)
    assert len(s.rows) == 1 and s.rows[0].zeros == 2 and s.rows[0].count == 4
    assert s.sparsity == 0.5
    text = str(s)
    assert "a/kernel" in text and "0.5000" in text and "total" in text
    lines = text.splitlines()
    assert len({len(line) for line in lines if set(line) == {"-", " "}}) == 1
    ms = jm.summary(jm.magnitude(params, 0.75))
    assert ms.rows[0].zeros == 3 and ms.sparsity == 0.75


# ----------------------------------------------------------------------------- errors


def test_errors_name_argument_and_leaf():
    params = random_params(np.random.default_rng(4), [(4, 6)])
    for bad in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="sparsity"):
            jm.magnitude(params, bad)
    with pytest.raises(ValueError, match="sparsity"):
        jm.magnitude(params, jnp.float32(1.0))
    with pytest.raises(TypeError, match="sparsity"):
        jm.magnitude(params, "0.5")
    with pytest.raises(ValueError, match="scope"):
        jm.magnitude(params, 0.5, scope="channel")
    with pytest.raises(ValueError, match="scope='layer'"):
        jm.magnitude(params, jm.erk(params, 0.5), scope="global")
    with pytest.raises(ValueError, match="missing leaves"):
        jm.magnitude(params, {"layer0": {"kernel": 0.5}}, scope="layer")
    bad_tree = jax.tree.map(lambda _: 0.5, params)
    bad_tree["layer0"]["kernel"] = 2.0
    with pytest.raises(ValueError, match="layer0/kernel"):
        jm.magnitude(params, bad_tree, scope="layer")
    ints = {"q": {"kernel": jnp.ones((4, 4), jnp.int8)}}
    with pytest.raises(TypeError, match="q/kernel"):
        jm.magnitude(ints, 0.5, where=lambda p, x: True)
    with pytest.raises(ValueError, match="n must satisfy"):
        jm.nm(params, 4, 4)
    with pytest.raises(ValueError, match="m must be a group size >= 2, got m=0"):
        jm.nm(params, 0, 0)
    with pytest.raises(ValueError, match=r"n must satisfy 1 <= n < m .*got n=0"):
        jm.nm(params, 0, 4)
    with pytest.raises(ValueError, match="n must satisfy"):
        jm.nm(params, -1, 4)
    with pytest.raises(ValueError, match="layer0/kernel.*not divisible by m=8"):
        jm.nm(params, 2, 8)
    masks = jm.magnitude(params, 0.5)
    with pytest.raises(ValueError, match="layer0/kernel.*shape"):
        jm.validate_masks(params, {"layer0": {"kernel": jnp.ones((6, 4), bool), "bias": None}})
    with pytest.raises(ValueError, match="layer0/kernel.*boolean"):
        jm.validate_masks(params, jax.tree.map(lambda m: m.astype(jnp.float32), masks))
    with pytest.raises(ValueError, match="grads"):
        jm.validate_masks(params, {"layer0": {"kernel": masks["layer0"]["kernel"]}}, "grads")
    with pytest.raises(ValueError, match="sparsity"):
        jm.erk(params, 1.0)
