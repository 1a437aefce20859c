"""Tests for jaxcompress.models: shapes, parameter counts, train/eval behaviour, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcompress.models import MLP, ResNet, SmallCNN, TransformerClassifier, resnet8, resnet20


def num_params(model: nnx.Module) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def images(n, h, w, c, seed=0):
    return jnp.asarray(np.random.default_rng(seed).random((n, h, w, c), np.float32))


# ----------------------------------------------------------------------------- MLP


def test_mlp_lenet_300_100_param_count_and_layout():
    model = MLP(rngs=nnx.Rngs(0))
    assert num_params(model) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10 == 266_610
    assert [layer.kernel.shape for layer in model.layers] == [(784, 300), (300, 100), (100, 10)]


def test_mlp_flattens_any_feature_shape():
    model = MLP(in_features=12, hidden=(5,), num_classes=3, rngs=nnx.Rngs(0))
    x = images(4, 2, 3, 2)
    out = model(x)
    assert out.shape == (4, 3)
    np.testing.assert_allclose(out, model(x.reshape(4, 12)), rtol=1e-6)


def test_mlp_without_hidden_layers_is_linear():
    model = MLP(in_features=6, hidden=(), num_classes=2, rngs=nnx.Rngs(0))
    x = images(3, 1, 6, 1).reshape(3, 6)
    layer = model.layers[0]
    np.testing.assert_allclose(model(x), x @ layer.kernel[...] + layer.bias[...], rtol=1e-6)


def test_mlp_rejects_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="in_features"):
        MLP(in_features=0, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"hidden\[1\]"):
        MLP(hidden=(10, 2.5), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="rngs"):
        MLP(rngs=0)
    model = MLP(rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="784 features"):
        model(images(2, 27, 28, 1))


# ----------------------------------------------------------------------------- SmallCNN


def test_small_cnn_shapes_and_params():
    model = SmallCNN(rngs=nnx.Rngs(0))
    assert model(images(3, 28, 28, 1)).shape == (3, 10)
    # conv kernels (3, 3, in, out) without bias, BN scale + bias, Dense head.
    expected = 9 * (1 * 32 + 32 * 64 + 64 * 128) + 2 * (32 + 64 + 128) + 128 * 10 + 10
    assert num_params(model) == expected
    assert model.blocks[1].conv.kernel.shape == (3, 3, 32, 64)


@pytest.mark.parametrize("shape", [(8, 8, 1), (32, 32, 3), (1, 1, 3), (13, 7, 3)])
def test_small_cnn_any_spatial_size(shape):
    model = SmallCNN(in_channels=shape[-1], num_classes=4, widths=(8, 8, 16, 16), rngs=nnx.Rngs(0))
    out = model(images(2, *shape))
    assert out.shape == (2, 4)
    assert bool(jnp.all(jnp.isfinite(out)))


def test_small_cnn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="pool_after"):
        SmallCNN(widths=(8, 8), pool_after=(True,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="widths"):
        SmallCNN(widths=(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="strides"):
        SmallCNN(widths=(8, 8), strides=(1, 1, 1), rngs=nnx.Rngs(0))
    model = SmallCNN(rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\(N, H, W, 1\)"):
        model(images(2, 28, 28, 3))


# ----------------------------------------------------------------------------- ResNet


def test_resnet20_param_count():
    model = resnet20(in_channels=3, rngs=nnx.Rngs(0))
    count = num_params(model)
    # He et al. (2016) quote 0.27M; 1x1 projection shortcuts (conv + BN) add 2,752.
    assert count == 272_474
    assert model.head.kernel.shape == (64, 10)
    assert len(model.stages) == 3 and all(len(s) == 3 for s in model.stages)


def test_resnet8_structure_and_shortcuts():
    model = resnet8(in_channels=1, num_classes=7, width=8, rngs=nnx.Rngs(0))
    blocks = [b for stage in model.stages for b in stage]
    assert len(blocks) == 3
    assert blocks[0].shortcut_conv is None
    assert blocks[1].shortcut_conv.kernel.shape == (1, 1, 8, 16)
    assert blocks[2].shortcut_conv.kernel.shape == (1, 1, 16, 32)
    assert model(images(2, 28, 28, 1)).shape == (2, 7)


@pytest.mark.parametrize("depth", [0, 7, 9, 21, -4])
def test_resnet_rejects_depth_not_6n_plus_2(depth):
    with pytest.raises(ValueError, match="6n \\+ 2"):
        ResNet(depth, rngs=nnx.Rngs(0))


def test_jitted_resnet_forward_several_input_sizes_without_retracing():
    model = resnet8(in_channels=3, rngs=nnx.Rngs(0))
    model.eval()
    traces = []

    @nnx.jit
    def forward(m, x):
        traces.append(x.shape)
        return m(x)

    for shape in [(2, 32, 32, 3), (3, 17, 9, 3), (1, 1, 1, 3)]:
        x = images(*shape)
        out = forward(model, x)
        assert out.shape == (shape[0], 10)
        np.testing.assert_allclose(out, model(x), rtol=2e-5, atol=2e-5)
        forward(model, x)  # second call with the same shape: no new trace
    assert len(traces) == 3


def test_batchnorm_train_and_eval_modes_differ():
    model = resnet8(in_channels=3, rngs=nnx.Rngs(0))
    x = images(8, 16, 16, 3) * 5.0 + 2.0  # far from the initial running stats (0, 1)
    mean0 = np.asarray(model.stem_bn.mean[...]).copy()

    model.eval()
    eval_out = model(x)
    np.testing.assert_array_equal(model.stem_bn.mean[...], mean0)  # eval: stats frozen

    model.train()
    train_out = model(x)
    assert not np.allclose(model.stem_bn.mean[...], mean0)  # train: running mean moved
    assert not np.allclose(train_out, eval_out, atol=1e-3)

    # Train mode normalises with batch statistics: each example depends on the others.
    alone = model(x[:1])
    assert not np.allclose(alone, train_out[:1], atol=1e-4)
    model.eval()
    np.testing.assert_allclose(model(x[:1]), model(x)[:1], rtol=1e-4, atol=1e-5)


def test_models_are_differentiable():
    model = SmallCNN(widths=(4, 8), rngs=nnx.Rngs(0))
    x, y = images(4, 8, 8, 1), jnp.array([0, 1, 2, 3])

    def loss(m):
        logits = m(x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    grads = nnx.grad(loss)(model)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert float(jnp.abs(grads["blocks"][0]["conv"]["kernel"][...]).sum()) > 0


# ----------------------------------------------------------------------------- Transformer


def make_transformer(**kw):
    return TransformerClassifier(50, d_model=16, num_heads=2, mlp_dim=32, max_len=12,
                                 rngs=nnx.Rngs(0), **kw)  # fmt: skip


def test_transformer_shapes():
    model = make_transformer(num_classes=3)
    tokens = jnp.array([[3, 4, 5, 0, 0, 0], [7, 8, 9, 10, 11, 12]], jnp.int32)
    assert model(tokens).shape == (2, 3)
    assert model.pos_embed.shape == (12, 16)
    assert model.embed.embedding.shape == (50, 16)


def test_transformer_padding_is_masked():
    model = make_transformer()
    model.eval()
    short = jnp.array([[3, 4, 5], [6, 0, 0]], jnp.int32)
    padded = jnp.pad(short, ((0, 0), (0, 7)))
    np.testing.assert_allclose(model(short), model(padded), rtol=1e-5, atol=1e-6)
    # A padded position never influences the result, whatever the embedding of id 0.
    model.embed.embedding[...] = model.embed.embedding[...].at[0].set(100.0)
    np.testing.assert_allclose(model(short), model(padded), rtol=1e-5, atol=1e-6)
    # but real tokens do
    other = short.at[0, 2].set(9)
    assert not np.allclose(model(other)[0], model(short)[0])


def test_transformer_dropout_follows_train_eval():
    model = make_transformer(dropout=0.3)
    tokens = jnp.array([[3, 4, 5, 6, 7, 0]], jnp.int32)
    model.train()
    a, b = model(tokens), model(tokens)
    assert not np.allclose(a, b)
    model.eval()
    np.testing.assert_array_equal(model(tokens), model(tokens))


def test_transformer_jit_and_validation():
    model = make_transformer()
    model.eval()
    forward = nnx.jit(lambda m, t: m(t))
    for length in (4, 12):
        tokens = jnp.ones((2, length), jnp.int32)
        np.testing.assert_allclose(forward(model, tokens), model(tokens), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="max_len=12"):
        model(jnp.ones((1, 13), jnp.int32))
    with pytest.raises(ValueError, match="integer tokens"):
        model(jnp.ones((1, 4), jnp.float32))
    with pytest.raises(ValueError, match="divisible"):
        TransformerClassifier(10, d_model=10, num_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dropout"):
        TransformerClassifier(10, dropout=1.0, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- Shared attention


@pytest.mark.parametrize("prescale", [True, False])
def test_shared_attention_matches_flax_with_mask_and_causal(prescale):
    from jaxcompress.models._attention import dot_product_attention

    kq, kk, kv, km = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(s, (2, 7, 3, 8)) for s in (kq, kk, kv))
    mask = jax.random.bernoulli(km, 0.7, (2, 1, 1, 7)).at[:, :, :, 0].set(True)
    for kw in ({}, {"mask": mask}, {"is_causal": True}, {"mask": mask, "is_causal": True}):
        want = nnx.dot_product_attention(q, k, v, deterministic=True, **kw)
        got = dot_product_attention(
            q, k, v, kw.get("mask"), causal=kw.get("is_causal", False), prescale=prescale
        )
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=str(kw.keys()))


def test_shared_attention_is_the_transformers_and_rejects_unsupported_options():
    from jaxcompress.models._attention import flax_attention_fn

    model = make_transformer(dropout=0.2)
    assert model.blocks[0].attn.attention_fn is flax_attention_fn
    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(ValueError, match="precision="):
        flax_attention_fn(q, q, q, precision=jax.lax.Precision.HIGHEST)
    with pytest.raises(ValueError, match="dropout_rng"):
        flax_attention_fn(q, q, q, dropout_rate=0.5, deterministic=False)
    # Flax's broadcast dropout: one keep mask for every batch row and head.
    out = flax_attention_fn(
        q,
        q,
        jnp.arange(32.0).reshape(1, 4, 2, 4).repeat(1, 0) * jnp.ones((3, 1, 1, 1)),
        dropout_rng=jax.random.key(1),
        dropout_rate=0.5,
        deterministic=False,
    )
    np.testing.assert_array_equal(out[0], out[2])
