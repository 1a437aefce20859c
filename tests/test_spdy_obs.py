"""SPDY's OBS database: options from one factorisation, stitching, search on the stitched loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import jit_counting
from flax import nnx

import jaxcompress as jc


class MLP(nnx.Module):
    def __init__(self, *, rngs):
        self.fc1 = nnx.Linear(16, 32, rngs=rngs)
        self.fc2 = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


OPTIONS = [0.0, 0.25, 0.5, 0.75, "2:4"]


@pytest.fixture(scope="module")
def setup():
    model = MLP(rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 16)) @ rng.standard_normal((16, 16)), jnp.float32)
    hs = jc.prune.hessians(model, x)
    params = nnx.state(model, nnx.Param)
    db = jc.spdy.obs_database(params, hs, OPTIONS, blocksize=8)
    return model, x, hs, params, db


def test_hessians_are_dense_layer_inputs(setup):
    model, x, hs, _, _ = setup
    assert list(hs) == ["fc1/kernel", "fc2/kernel"]
    hidden = jax.nn.relu(model.fc1(x))
    for name, inp in (("fc1/kernel", x), ("fc2/kernel", hidden)):
        expected = 2.0 * np.asarray(inp).T @ np.asarray(inp) / inp.shape[0]
        np.testing.assert_allclose(np.asarray(hs[name]), expected, rtol=1e-5, atol=1e-4)


def test_database_levels(setup):
    _, x, hs, params, db = setup
    assert db.names == ("fc1/kernel", "fc2/kernel")
    assert db.labels[0] == ("0.0000", "0.2500", "0.5000", "0.7500", "2:4")
    for name in db.names:
        w = np.asarray(params[name.split("/")[0]]["kernel"][...])
        h = hs[name]
        kern, masks = db.kernels[name], db.masks[name]
        np.testing.assert_array_equal(kern[0], w)
        assert masks[0].all()
        for j in (1, 2):  # nested masks
            assert not np.any(masks[j + 1] & ~masks[j])
        for j, s in ((1, 0.25), (2, 0.5), (3, 0.75)):  # exact sparsity per block of 8 rows
            per_block = masks[j].reshape(-1, 8 * w.shape[1]).sum(axis=1)
            np.testing.assert_array_equal(per_block, round(8 * w.shape[1] * (1 - s)))
            assert np.all(kern[j][~masks[j]] == 0)
        # the first level and the N:M option are plain SparseGPT runs from the dense kernel
        first, _ = jc.prune.sparsegpt_layer(w, h, sparsity=0.25, blocksize=8)
        np.testing.assert_allclose(kern[1], np.asarray(first), rtol=1e-5, atol=1e-6)
        nm, nm_mask = jc.prune.sparsegpt_layer(w, h, n=2, m=4, blocksize=8)
        np.testing.assert_allclose(kern[4], np.asarray(nm), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(masks[4], np.asarray(nm_mask))
        err, raw = db.errors[name], db.raw_errors[name]
        assert err[0] == 0 and np.all(np.diff(err[:4]) > 0)
        assert np.all(err[1:] < raw[1:])  # reconstruction beats plain magnitude pruning
    # the error is ||X dW||^2 / ||X W||^2 of the layer's dense inputs
    w1, k1 = np.asarray(params["fc1"]["kernel"][...]), db.kernels["fc1/kernel"][2]
    xs = np.asarray(x, np.float64)
    direct = np.linalg.norm(xs @ (k1 - w1)) ** 2 / np.linalg.norm(xs @ w1) ** 2
    assert db.errors["fc1/kernel"][2] == pytest.approx(direct, rel=1e-3)
    assert jc.spdy.hessian_error(hs["fc1/kernel"], w1, k1) == pytest.approx(direct, rel=1e-3)


def test_stitcher_and_search_on_the_stitched_loss(setup):
    model, x, _, params, db = setup
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    st = jc.spdy.stitcher(db, params)
    target = model(x)

    @jit_counting
    def loss(st, params, choice):
        p, _ = st(params, choice)
        return jnp.mean((nnx.merge(graphdef, p, rest)(x) - target) ** 2)

    for choice in ([0, 0], [2, 3], [4, 1]):
        p, masks = st(params, jnp.asarray(choice))
        ref_p, ref_masks = db.stitch(params, choice)
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref_p), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        jc.masks.validate_masks(p, masks)
    flops = {"fc1/kernel": 16 * 32, "fc2/kernel": 32 * 8}
    options = [0.0, 0.25, 0.5, 0.75, "2:4"]
    table = jc.spdy.TimingTable.from_flops(
        flops, options, time_fn=lambda name, f, o: f * (0.5 if o == "2:4" else 1 - o)
    )
    assert table.layers[0].labels == db.labels[0]
    budget = jc.spdy.budget(table, 1.5)
    result = jc.spdy.search(
        db.error_list(), table, budget,
        lambda c: float(loss(st, params, jnp.asarray(c))),
        randinits=4, maxnoimp=2, initial=[np.ones(2)], progress=False,
    )  # fmt: skip
    assert jc.spdy.modelled_speedup(table, result.choice) >= 1.5
    assert result.score == pytest.approx(float(loss(st, params, jnp.asarray(result.choice))))
    assert loss.traces == 1  # every profile scored by one compiled loss


def test_bad_database_input(setup):
    _, _, hs, params, _ = setup
    db = jc.spdy.obs_database
    with pytest.raises(ValueError, match="option 0 must be 0.0"):
        db(params, hs, [0.5, 0.75])
    with pytest.raises(ValueError, match="must increase"):
        db(params, hs, [0.0, 0.5, 0.25])
    with pytest.raises(ValueError, match="not a sparsity or 'n:m'"):
        db(params, hs, [0.0, "half"])
    with pytest.raises(ValueError, match="divisible by m=32"):
        db(params, hs, [0.0, "2:32"])
    with pytest.raises(ValueError, match="does not fit a kernel"):
        db(params, {"fc1/kernel": hs["fc2/kernel"]}, [0.0, 0.5])
    with pytest.raises(ValueError, match="no leaves named"):
        db(params, {"fc3/kernel": hs["fc1/kernel"]}, [0.0, 0.5])
    with pytest.raises(ValueError, match="percdamp must be > 0"):
        db(params, hs, [0.0, 0.5], percdamp=-1.0)
