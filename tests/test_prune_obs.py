"""SparseGPT and Wanda: per-layer maths against NumPy oracles, sequential calibration, sharding,
bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxcompress as jc
from jaxcompress.spdy import NotPositiveDefiniteError

# ------------------------------------------------------------------------------- oracles


def np_sparsegpt(w, h, *, sparsity=None, n=None, m=None, blocksize=128, percdamp=0.01):
    """Float64 NumPy restatement of SparseGPT in the Flax layout (w: (d_in, d_out)).

    Follows the reference's route to U: the explicit inverse, then its upper Cholesky factor.
    """
    w = np.array(w, np.float64)
    h = np.array(h, np.float64)
    d = w.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[dead, :] = 0
    h += percdamp * np.mean(np.diag(h)) * np.eye(d)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, H^-1 = U^T U
    mask = np.ones(w.shape, bool)
    for i1 in range(0, d, blocksize):
        i2 = min(i1 + blocksize, d)
        w1, u1 = w[i1:i2].copy(), u[i1:i2, i1:i2]
        e1 = np.zeros_like(w1)
        keep = np.ones(w1.shape, bool)
        if sparsity is not None:
            sal = (w1**2 / np.diag(u1)[:, None] ** 2).ravel()
            k = sal.size - math.ceil(sal.size * (1 - sparsity) - sal.size * 2.0**-40)
            flat = np.ones(sal.size, bool)
            flat[np.argsort(sal, kind="stable")[:k]] = False
            keep = flat.reshape(w1.shape)
        for i in range(i2 - i1):
            if n is not None and i % m == 0:
                sal = w1[i : i + m] ** 2 / np.diag(u1)[i : i + m, None] ** 2
                order = np.argsort(-sal, axis=0, kind="stable")
                grp = np.zeros(sal.shape, bool)
                np.put_along_axis(grp, order[:n], True, axis=0)
                keep[i : i + m] = grp
            q = np.where(keep[i], w1[i], 0)
            err = (w1[i] - q) / u1[i, i]
            w1[i:] -= np.outer(u1[i, i:], err)
            w1[i], e1[i] = q, err
        w[i1:i2], mask[i1:i2] = w1, keep
        w[i2:] -= u[i1:i2, i2:].T @ e1
    return w, mask


def correlated_inputs(rng, rows, d, dead=()):
    x = rng.standard_normal((rows, d)) @ (np.eye(d) + rng.standard_normal((d, d)) / d**0.25)
    x[:, list(dead)] = 0
    return x


def hessian(x):
    return 2.0 * x.T @ x / x.shape[0]


# ------------------------------------------------------------------------------- models


class MLP(nnx.Module):
    def __init__(self, dims, *, rngs):
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:], strict=True)]
        )

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x


class Block(nnx.Module):
    """Pre-LN causal self-attention block with separate q/k/v/o and an MLP."""

    def __init__(self, d, heads, *, rngs):
        self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
        self.q, self.k = nnx.Linear(d, d, rngs=rngs), nnx.Linear(d, d, rngs=rngs)
        self.v, self.o = nnx.Linear(d, d, rngs=rngs), nnx.Linear(d, d, rngs=rngs)
        self.fc1, self.fc2 = nnx.Linear(d, 2 * d, rngs=rngs), nnx.Linear(2 * d, d, rngs=rngs)
        self.heads = heads

    def __call__(self, x):
        b, t, d = x.shape
        y = self.ln1(x)
        q, k, v = (f(y).reshape(b, t, self.heads, -1) for f in (self.q, self.k, self.v))
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // self.heads)
        att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -1e9)
        y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(att, -1), v).reshape(b, t, d)
        x = x + self.o(y)
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class TinyLM(nnx.Module):
    def __init__(self, vocab=16, d=16, layers=1, heads=2, *, rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, heads, rngs=rngs) for _ in range(layers)])
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def kernels(params):
    return {
        jc.masks.path_str(p): np.asarray(x)
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
        if jc.masks.path_str(p).endswith("kernel")
    }


@pytest.fixture(scope="module")
def lm():
    model = TinyLM(rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 13, (16, 8)), jnp.int32)
    return model, tokens


# ------------------------------------------------------------------------------- layer maths


def test_single_weight_is_the_obs_closed_form():
    rng = np.random.default_rng(0)
    d, c = 8, 3
    x = correlated_inputs(rng, 64, d)
    h = hessian(x).astype(np.float32)
    w = rng.standard_normal((d, c)).astype(np.float32) + 2.0
    w[0] = [1e-3, -2e-3, 1.5e-3]  # input row 0 has the smallest saliency in every column
    out, mask = jc.prune.sparsegpt_layer(w, h, sparsity=3 / 24, blocksize=d, percdamp=0.01)
    assert not np.asarray(mask)[0].any() and np.asarray(mask)[1:].all()
    hd = h.astype(np.float64) + 0.01 * np.mean(np.diag(h)) * np.eye(d)
    hinv = np.linalg.inv(hd)
    expected = w - np.outer(hinv[:, 0], w[0] / hinv[0, 0])  # dW = -w_0 / [H^-1]_00 H^-1_{:,0}
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(out)[0] == 0)


@pytest.mark.parametrize("crit", [{"sparsity": 0.6}, {"n": 2, "m": 4}])
def test_sparsegpt_layer_equals_numpy_restatement(crit):
    rng = np.random.default_rng(1)
    d, c, bs = 320, 12, 32  # 10 blocks: three superblocks, the last one partial
    x = correlated_inputs(rng, 400, d, dead=(5, 100))
    h, w = hessian(x), rng.standard_normal((d, c))
    with jax.enable_x64(True):
        out, mask = jc.prune.sparsegpt_layer(w, h, blocksize=bs, **crit)
        assert out.dtype == jnp.float64
    ref, ref_mask = np_sparsegpt(w, h, blocksize=bs, **crit)
    np.testing.assert_array_equal(np.asarray(mask), ref_mask)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-9, atol=1e-10)
    assert np.all(np.asarray(out)[[5, 100]] == 0)  # dead inputs are zeroed and pruned
    # float32 (the default) reaches the same reconstruction error
    out32, _ = jc.prune.sparsegpt_layer(
        w.astype(np.float32), h.astype(np.float32), blocksize=bs, **crit
    )
    err = lambda v: np.linalg.norm(x @ (np.asarray(v, np.float64) - w))  # noqa: E731
    assert err(out32) == pytest.approx(err(ref), rel=2e-3)


def test_partial_block_and_blocksize_larger_than_layer():
    rng = np.random.default_rng(2)
    for d, bs in ((40, 16), (24, 128)):
        x = correlated_inputs(rng, 64, d)
        h, w = hessian(x), rng.standard_normal((d, 5))
        with jax.enable_x64(True):
            out, mask = jc.prune.sparsegpt_layer(w, h, sparsity=0.5, blocksize=bs)
        ref, ref_mask = np_sparsegpt(w, h, sparsity=0.5, blocksize=bs)
        np.testing.assert_array_equal(np.asarray(mask), ref_mask)
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-9, atol=1e-10)


def test_reconstruction_far_below_masking_and_exact_masks():
    rng = np.random.default_rng(3)
    d, c, bs = 128, 32, 32
    # activations of low effective rank (as in LMs): what is pruned can be re-expressed
    x = rng.standard_normal((256, 8)) @ rng.standard_normal((8, d))
    x = (x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32)
    h, w = hessian(x), rng.standard_normal((d, c)).astype(np.float32)
    for crit in ({"sparsity": 0.5}, {"n": 2, "m": 4}):
        out, mask = (np.asarray(a) for a in jc.prune.sparsegpt_layer(w, h, blocksize=bs, **crit))
        _, magnitude = jc.prune.oneshot({"kernel": w}, **crit, scope="global")
        obs_err = np.linalg.norm(x @ (out - w))
        same_mask_err = np.linalg.norm(x @ (w * mask - w))
        magnitude_err = np.linalg.norm(x @ (w * np.asarray(magnitude["kernel"]) - w))
        assert obs_err < 0.4 * same_mask_err, (crit, obs_err, same_mask_err)
        assert obs_err < 0.3 * magnitude_err, (crit, obs_err, magnitude_err)
        assert np.all(out[~mask] == 0)
        if "sparsity" in crit:
            per_block = mask.reshape(d // bs, bs * c).sum(axis=1)
            np.testing.assert_array_equal(per_block, bs * c // 2)
        else:
            groups = mask.reshape(d // 4, 4, c).sum(axis=1)
            np.testing.assert_array_equal(groups, 2)


def test_wanda_layer_scores_per_output():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((16, 6)).astype(np.float32)
    norms = rng.random(16).astype(np.float32) + 0.1
    out, mask = jc.prune.wanda_layer(w, norms, sparsity=0.25)
    score = np.abs(w) * norms[:, None]
    for j in range(6):  # each output keeps its 12 largest scores
        np.testing.assert_array_equal(
            np.asarray(mask)[:, j], score[:, j] >= np.sort(score[:, j])[4]
        )
    np.testing.assert_array_equal(np.asarray(out), np.where(mask, w, 0))
    _, nm_mask = jc.prune.wanda_layer(w, norms, n=2, m=4)
    groups = score.reshape(4, 4, 6)
    top2 = np.argsort(-groups, axis=1, kind="stable")[:, :2]
    expected = np.zeros(groups.shape, bool)
    np.put_along_axis(expected, top2, True, axis=1)
    np.testing.assert_array_equal(np.asarray(nm_mask), expected.reshape(16, 6))


def test_ties_go_to_the_lower_index():
    # equal saliencies (H = I, equal weights): the lower row-major index of a block is pruned
    w = np.ones((16, 4), np.float32)
    out, mask = jc.prune.sparsegpt_layer(
        w, np.eye(16, dtype=np.float32), sparsity=0.25, blocksize=8
    )
    expected = np.arange(32).reshape(8, 4) >= 8
    np.testing.assert_array_equal(np.asarray(mask), np.concatenate([expected, expected]))
    np.testing.assert_array_equal(np.asarray(out), np.where(mask, w, 0))
    _, wmask = jc.prune.wanda_layer(w, np.ones(16, np.float32), sparsity=0.25)  # per column
    np.testing.assert_array_equal(np.asarray(wmask), np.arange(16)[:, None].repeat(4, 1) >= 4)


# ------------------------------------------------------------------------------- models


def test_sequential_calibration_uses_pruned_upstream():
    model = MLP([8, 16, 8], rngs=nnx.Rngs(1))
    x = jnp.asarray(np.random.default_rng(5).standard_normal((64, 8)), jnp.float32)
    before = kernels(nnx.state(model, nnx.Param))
    params, masks = jc.prune.sparsegpt(model, x, sparsity=0.5, blocksize=8)
    after = kernels(params)
    np.testing.assert_array_equal(
        kernels(nnx.state(model, nnx.Param))["layers/0/kernel"], before["layers/0/kernel"]
    )  # model untouched
    layer0 = model.layers[0]
    # the second layer's Hessian comes from the *pruned* first layer's outputs
    pruned_hidden = jax.nn.relu(x @ after["layers/0/kernel"] + layer0.bias[...])
    dense_hidden = jax.nn.relu(layer0(x))
    w1 = before["layers/1/kernel"]
    seq, _ = jc.prune.sparsegpt_layer(w1, hessian(pruned_hidden), sparsity=0.5, blocksize=8)
    non_seq, _ = jc.prune.sparsegpt_layer(w1, hessian(dense_hidden), sparsity=0.5, blocksize=8)
    np.testing.assert_allclose(after["layers/1/kernel"], np.asarray(seq), rtol=2e-4, atol=2e-5)
    assert np.abs(np.asarray(seq) - np.asarray(non_seq)).max() > 1e-2
    jc.masks.validate_masks(params, masks)
    flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda v: v is None)[0]
    by_name = {jc.masks.path_str(p): v for p, v in flat}
    assert by_name["layers/0/bias"] is None and by_name["layers/1/kernel"].dtype == jnp.bool_


def test_transformer_groups_qkv_and_prunes_every_dense_layer(lm):
    model, tokens = lm
    from jaxcompress.prune._calibrate import prepare

    cal = prepare(model, tokens, "test", {})
    names = [la.name for la in cal.layers]
    groups = [tuple(names[i].split("/")[-2] for i in g) for g in cal.groups]
    assert groups[:4] == [("q", "k", "v"), ("o",), ("fc1",), ("fc2",)]
    assert names[-1] == "head/kernel" and len(cal.groups) == 5
    params, masks = jc.prune.sparsegpt(model, tokens, n=2, m=4, blocksize=16)
    summary = jc.masks.summary(masks)
    assert summary.sparsity == pytest.approx(0.5)
    # q, k, v were solved on the same Hessian: the block's LayerNorm output
    h = hessian(np.asarray(model.blocks[0].ln1(model.embed(tokens))).reshape(-1, 16))
    ref, _ = jc.prune.sparsegpt_layer(model.blocks[0].v.kernel[...], h, n=2, m=4, blocksize=16)
    np.testing.assert_allclose(kernels(params)["blocks/0/v/kernel"], ref, rtol=1e-4, atol=1e-5)
    wparams, _ = jc.prune.wanda(model, tokens, sparsity=0.5)
    assert jc.masks.summary(wparams).sparsity > 0.49


def test_multi_head_attention_linear_general():
    model = jc.models.TransformerClassifier(
        11,
        d_model=16,
        num_heads=2,
        num_layers=1,
        mlp_dim=32,
        max_len=8,
        dropout=0.1,
        rngs=nnx.Rngs(0),
    )
    tokens = jnp.asarray(np.random.default_rng(6).integers(1, 11, (8, 8)), jnp.int32)
    params, masks = jc.prune.wanda(model, tokens, sparsity=0.5)
    pruned = {
        jc.masks.path_str(p)
        for p, m in jax.tree_util.tree_flatten_with_path(masks)[0]
        if m is not None
    }
    assert {"blocks/0/attn/query/kernel", "blocks/0/attn/out/kernel"} <= pruned
    out = kernels(params)["blocks/0/attn/out/kernel"]  # (heads, head_dim, d): d_in = 16
    assert out.shape == (2, 8, 16)
    np.testing.assert_array_equal((out.reshape(16, 16) != 0).sum(axis=0), 8)


def test_sharded_calibration_equals_single_device(lm):
    model, tokens = lm
    single, single_masks = jc.prune.sparsegpt(model, tokens, sparsity=0.5, blocksize=16)
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    sharded_model = nnx.clone(model)
    state = nnx.state(sharded_model, nnx.Param)
    shard = lambda path, x: jax.device_put(  # noqa: E731
        x, NamedSharding(mesh, P(None, "model") if x.ndim == 2 and x.shape[1] % 2 == 0 else P())
    )
    nnx.update(sharded_model, jax.tree_util.tree_map_with_path(shard, state))
    params, masks = jc.prune.sparsegpt(sharded_model, tokens, sparsity=0.5, blocksize=16, mesh=mesh)
    fc1 = params["blocks"][0]["fc1"]["kernel"][...]
    assert fc1.sharding.spec == P(None, "model")  # kernels keep their sharding
    for name, k in kernels(params).items():
        np.testing.assert_allclose(k, kernels(single)[name], rtol=1e-4, atol=1e-5, err_msg=name)
    a = [np.asarray(x) for x in jax.tree.leaves(masks)]
    b = [np.asarray(x) for x in jax.tree.leaves(single_masks)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------------- bad input


def test_bad_input_is_rejected_before_any_work(lm):
    model, tokens = lm
    sg = jc.prune.sparsegpt
    with pytest.raises(ValueError, match="forward pass failed.*float32"):
        sg(model, tokens.astype(jnp.float32), sparsity=0.5)
    with pytest.raises(ValueError, match="forward pass failed"):
        sg(MLP([8, 4], rngs=nnx.Rngs(0)), jnp.ones((32, 5)), sparsity=0.5)
    with pytest.raises(ValueError, match="at least 32 calibration rows.*gives 16"):
        sg(model, tokens[:2], sparsity=0.5)
    with pytest.raises(ValueError, match="percdamp must be > 0"):
        sg(model, tokens, sparsity=0.5, percdamp=0.0)
    with pytest.raises(ValueError, match="blocksize=6 must be divisible by m=4"):
        sg(model, tokens, n=2, m=4, blocksize=6)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        sg(model, tokens, sparsity=1.0)
    with pytest.raises(ValueError, match="exactly one criterion"):
        jc.prune.wanda(model, tokens, sparsity=0.5, n=2, m=4)
    with pytest.raises(ValueError, match="no prunable Dense kernel"):
        sg(model, tokens, sparsity=0.5, where=jc.masks.select(include="nothing"))
    with pytest.raises(ValueError, match="not the kernel of an nnx.Linear"):
        sg(model, tokens, sparsity=0.5, where=lambda p, x: x.ndim == 2)  # selects the embedding
    with pytest.raises(TypeError, match="dtype <U1"):
        sg(model, np.array([["a"]]), sparsity=0.5)
    with pytest.raises(ValueError, match="non-finite"):
        sg(MLP([8, 4], rngs=nnx.Rngs(0)), jnp.full((32, 8), jnp.nan), sparsity=0.5)
    with pytest.raises(ValueError, match="d_in=8 inputs, not divisible by m=16"):
        jc.prune.wanda(MLP([8, 4], rngs=nnx.Rngs(0)), jnp.ones((4, 8)), n=8, m=16)
    with pytest.raises(TypeError, match=r"hessians: unexpected keyword argument\(s\) \['wher'\]"):
        jc.prune.hessians(model, tokens, wher=None)


def test_hessian_not_positive_definite_names_the_layer():
    model = MLP([4, 8, 4], rngs=nnx.Rngs(0))
    model.layers[0].kernel.set_value(model.layers[0].kernel[...] * 1e25)  # X^T X overflows
    before = np.asarray(model.layers[1].kernel[...])
    x = jnp.asarray(np.random.default_rng(7).standard_normal((16, 4)), jnp.float32)
    with pytest.raises(NotPositiveDefiniteError, match="'layers/1/kernel'.*larger percdamp"):
        jc.prune.sparsegpt(model, x, sparsity=0.5, blocksize=4)
    np.testing.assert_array_equal(np.asarray(model.layers[1].kernel[...]), before)
    with pytest.raises(NotPositiveDefiniteError, match="percdamp=0.1"):
        jc.prune.sparsegpt_layer(np.ones((2, 2)), -np.eye(2), sparsity=0.5)
