"""Tests for jaxcompress.prune: one-shot pruning and BatchNorm recalibration."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.datasets import load_digits

from jaxcompress import masks as jm
from jaxcompress import prune, train
from jaxcompress.models import SmallCNN


def _params_dict(seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    return {
        "conv": {"kernel": jax.random.normal(k[0], (3, 3, 8, 16)), "bias": jnp.ones((16,))},
        "dense": {"kernel": jax.random.normal(k[1], (64, 10)), "bias": jnp.ones((10,))},
        "bn": {"scale": jax.random.normal(k[2], (16,))},
    }


def _selected(tree):
    return [
        leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if jm.prunable(path, leaf)
    ]


@pytest.mark.parametrize("sparsity", [0.7, 0.95])
@pytest.mark.parametrize("kind", ["dict", "nnx"])
def test_oneshot_global_exact_sparsity(kind, sparsity):
    if kind == "dict":
        params = _params_dict()
    else:
        params = nnx.state(SmallCNN(1, 10, (8, 16), rngs=nnx.Rngs(0)), nnx.Param)
    pruned, masks = prune.oneshot(params, sparsity=sparsity)
    jm.validate_masks(params, masks)
    total = sum(leaf.size for leaf in _selected(params))
    kept = sum(int(jnp.sum(leaf != 0)) for leaf in _selected(pruned))
    assert kept == math.ceil(total * (1 - sparsity) - 1e-9)
    # Survivors are the largest magnitudes overall, and unselected leaves are untouched.
    survivors = np.concatenate(
        [np.abs(np.asarray(w))[np.asarray(w) != 0] for w in _selected(pruned)]
    )
    removed = np.concatenate(
        [
            np.abs(np.asarray(w0))[np.asarray(w) == 0]
            for w0, w in zip(_selected(params), _selected(pruned), strict=True)
        ]
    )
    assert survivors.min() >= removed.max()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not jm.prunable(path, leaf):
            got = [v for p, v in jax.tree_util.tree_flatten_with_path(pruned)[0] if p == path][0]
            np.testing.assert_array_equal(np.asarray(got), np.asarray(leaf))
    mask_leaves = jax.tree.leaves(masks, is_leaf=lambda x: x is None)
    assert sum(m is None for m in mask_leaves) == len(mask_leaves) - len(_selected(params))


def test_oneshot_layer_scope_prunes_every_leaf_equally():
    params = _params_dict(1)
    pruned, _ = prune.oneshot(params, sparsity=0.75, scope="layer")
    for w in _selected(pruned):
        assert int(jnp.sum(w != 0)) == math.ceil(w.size * 0.25)


def test_oneshot_nm_valid_groups():
    params = _params_dict(2)
    pruned, masks = prune.oneshot(params, n=2, m=4)
    leaves = [m for m in jax.tree.leaves(masks, is_leaf=lambda x: x is None) if m is not None]
    assert len(leaves) == 2
    for w, mk in zip(_selected(pruned), leaves, strict=True):
        groups = np.moveaxis(np.asarray(mk), -2, -1)
        groups = groups.reshape(*groups.shape[:-1], -1, 4)
        assert np.all(groups.sum(-1) == 2)
        np.testing.assert_array_equal(np.asarray(w) != 0, np.asarray(mk))
    np.testing.assert_array_equal(np.asarray(pruned["conv"]["bias"]), 1.0)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({}, ValueError, "exactly one"),
        ({"sparsity": 0.5, "n": 2, "m": 4}, ValueError, "exactly one"),
        ({"sparsity": 1.0}, ValueError, "sparsity"),
        ({"sparsity": -0.1}, ValueError, "sparsity"),
        ({"sparsity": "0.5"}, TypeError, "sparsity"),
        ({"sparsity": 0.5, "scope": "row"}, ValueError, "scope"),
        ({"n": 2}, ValueError, "n and m"),
        ({"n": 4, "m": 4}, ValueError, "0 < n < m"),
        ({"n": 2.0, "m": 4}, TypeError, "ints"),
        ({"n": 2, "m": 4, "scope": "layer"}, ValueError, "scope"),
        ({"sparsity": 0.5, "where": "kernel"}, TypeError, "where"),
    ],
)
def test_oneshot_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        prune.oneshot(_params_dict(), **kwargs)


# ---------------------------------------------------------------------------- BatchNorm


@pytest.fixture(scope="module")
def trained_digits_cnn():
    """A BN CNN trained briefly on scikit-learn's real 8x8 digits; its dense state."""
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    train_ds, test_ds = (x[:1400], y[:1400]), (x[1400:], y[1400:])
    model = SmallCNN(1, 10, (16, 32), rngs=nnx.Rngs(0))
    train.fit(
        model, optax.sgd(0.05, momentum=0.9), train_ds, epochs=6, batch_size=64, progress=False
    )
    model.eval()
    return model, nnx.state(model), train_ds, test_ds


def test_recalibration_recovers_accuracy_after_pruning(trained_digits_cnn):
    model, dense_state, train_ds, test_ds = trained_digits_cnn
    nnx.update(model, dense_state)
    dense = train.evaluate(model, test_ds)["accuracy"]
    assert dense > 0.85
    pruned, _ = prune.oneshot(nnx.state(model, nnx.Param), sparsity=0.8)
    nnx.update(model, pruned)
    raw = train.evaluate(model, test_ds)["accuracy"]
    calib = prune.calibration_batches(train_ds, num_batches=100, batch_size=128, seed=1)
    prune.recalibrate_batchnorm(model, calib)
    recal = train.evaluate(model, test_ds)["accuracy"]
    assert dense - raw > 0.1, (dense, raw)  # pruning at 80% hurts the raw model
    assert recal > raw + 0.1, (dense, raw, recal)
    assert (recal - raw) >= 0.6 * (dense - raw), (dense, raw, recal)
    # Only BatchNorm statistics changed: the pruned params are intact.
    for a, b in zip(
        jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(pruned), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    nnx.update(model, dense_state)


def _batch_stats(model, x):
    """Per-BatchNorm (mean, var) of one batch, computed by hand with the model's own layers."""
    out = []
    h = jnp.asarray(x)
    for block, pool in zip(model.blocks, model.pool_after, strict=True):
        z = block.conv(h)
        mu, var = jnp.mean(z, axis=(0, 1, 2)), jnp.var(z, axis=(0, 1, 2))
        out.append((mu, var))
        h = jax.nn.relu(
            (z - mu) / jnp.sqrt(var + block.bn.epsilon) * block.bn.scale[...] + block.bn.bias[...]
        )
        if pool:
            h = nnx.max_pool(h, (2, 2), strides=(2, 2), padding="SAME")
    return out


def test_recalibration_ema_and_cumulative_formulas(trained_digits_cnn):
    model, dense_state, train_ds, _ = trained_digits_cnn
    nnx.update(model, dense_state)
    x = train_ds[0]
    b1, b2 = x[:50], x[50:100]
    s1, s2 = _batch_stats(model, b1), _batch_stats(model, b2)
    momenta = [blk.bn.momentum for blk in model.blocks]
    model.train()

    # EMA, alpha = 0.3, batches cycled: b1, b2, b1.
    a = 0.3
    with pytest.warns(UserWarning, match="reset statistics"):  # (1 - 0.3)**3 = 0.34 > 1%
        prune.recalibrate_batchnorm(model, [b1, b2], num_batches=3, momentum=a)
    for blk, (m1, v1), (m2, v2) in zip(model.blocks, s1, s2, strict=True):
        want_mean = a * m1 * (1 - a) ** 2 + a * m2 * (1 - a) + a * m1
        want_var = (1 - a) ** 3 + a * v1 * (1 - a) ** 2 + a * v2 * (1 - a) + a * v1
        np.testing.assert_allclose(blk.bn.mean[...], want_mean, rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(blk.bn.var[...], want_var, rtol=2e-4, atol=2e-5)
    assert [blk.bn.momentum for blk in model.blocks] == momenta  # own momentum kept
    assert all(blk.bn.use_running_average for blk in model.blocks)  # eval mode afterwards

    # Cumulative: the exact mean of the per-batch statistics, (x, y) batches accepted.
    prune.recalibrate_batchnorm(model, [(b1, None), (b2, None)], num_batches=2, mode="cumulative")
    for blk, (m1, v1), (m2, v2) in zip(model.blocks, s1, s2, strict=True):
        np.testing.assert_allclose(blk.bn.mean[...], (m1 + m2) / 2, rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(blk.bn.var[...], (v1 + v2) / 2, rtol=2e-4, atol=2e-5)
    nnx.update(model, dense_state)


def test_calibration_batches():
    x = np.arange(1000, dtype=np.float32).reshape(1000, 1)
    out = prune.calibration_batches((x, None), num_batches=7, batch_size=32, subset_size=100)
    assert len(out) == 7 and all(b.shape == (32, 1) for b in out)
    values = np.concatenate(out).ravel()
    assert len(np.unique(values)) == 100  # 224 draws cycle through a 100-example subset
    again = prune.calibration_batches((x, None), num_batches=7, batch_size=32, subset_size=100)
    np.testing.assert_array_equal(np.concatenate(again), np.concatenate(out))
    default = prune.calibration_batches(x, num_batches=3, batch_size=10)
    assert len(np.unique(np.concatenate(default))) == 30
    with pytest.raises(ValueError, match="batch_size"):
        prune.calibration_batches(x, batch_size=0)
    with pytest.raises(ValueError, match="subset_size"):
        prune.calibration_batches(x, subset_size=5000)


def test_recalibrate_errors():
    model = SmallCNN(1, 10, (4,), rngs=nnx.Rngs(0))
    batch = [np.zeros((4, 8, 8, 1), np.float32)]
    with pytest.raises(ValueError, match="num_batches"):
        prune.recalibrate_batchnorm(model, batch, num_batches=0)
    with pytest.raises(ValueError, match="momentum"):
        prune.recalibrate_batchnorm(model, batch, momentum=0.0)
    with pytest.raises(ValueError, match="mode"):
        prune.recalibrate_batchnorm(model, batch, mode="median")
    with pytest.raises(ValueError, match="empty"):
        prune.recalibrate_batchnorm(model, [])
    with pytest.raises(TypeError, match="model"):
        prune.recalibrate_batchnorm({"a": 1}, batch)
    with pytest.raises(ValueError, match="no flax.nnx.BatchNorm"):
        prune.recalibrate_batchnorm(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), batch)
