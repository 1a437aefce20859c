"""Tests for jaxcompress.kernels.sparsify_for_inference: NNX conversion, Orbax round trip."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcompress.kernels import (
    NMConv1x1,
    NMLinear,
    NMMeta,
    PackedNM,
    nm_mask,
    sparsify_for_inference,
)


class _Net(nnx.Module):
    """Linear -> relu -> Linear -> 1x1 Conv (stride 2) -> 3x3 Conv -> Linear head."""

    def __init__(self, rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(16, 32, **kw), nnx.Linear(32, 8, **kw)])
        self.pointwise = nnx.Conv(8, 8, (1, 1), strides=2, **kw)
        self.spatial = nnx.Conv(8, 4, (3, 3), **kw)
        self.head = nnx.Linear(4, 3, **kw)

    def __call__(self, x):
        h = jax.nn.relu(self.layers[0](x))
        h = self.pointwise(self.layers[1](h))
        return self.head(self.spatial(jax.nn.relu(h)))


def _nm_net(seed=0, n=2, m=4, **kw):
    """A _Net whose Linear / 1x1 Conv kernels satisfy n:m (as after N:M training)."""
    model = _Net(nnx.Rngs(seed), **kw)
    for layer in (*model.layers, model.pointwise):
        k = layer.kernel[...]
        layer.kernel[...] = k * nm_mask(k, n, m)
    return model


_CONVERTIBLE = lambda path, layer: path not in ("spatial", "head")  # noqa: E731


def _x(dtype=jnp.float32):
    return jax.random.normal(jax.random.key(1), (2, 6, 6, 16)).astype(dtype)


def test_converted_model_equals_masked_dense_model_f32():
    model = _nm_net()
    kernel_before = np.asarray(model.layers[0].kernel[...])
    sparse, report = sparsify_for_inference(model, where=_CONVERTIBLE)
    assert isinstance(sparse.layers[0], NMLinear) and isinstance(sparse.pointwise, NMConv1x1)
    assert isinstance(sparse.spatial, nnx.Conv) and isinstance(sparse.head, nnx.Linear)
    np.testing.assert_allclose(sparse(_x()), model(_x()), rtol=1e-5, atol=1e-6)
    # the input model is untouched
    assert isinstance(model.layers[0], nnx.Linear)
    np.testing.assert_array_equal(model.layers[0].kernel[...], kernel_before)
    # jitted, through nnx.jit, with the same result
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(sparse, _x()), sparse(_x()), rtol=1e-6)


def test_converted_model_equals_masked_dense_model_bf16():
    model = _nm_net(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    sparse, _ = sparsify_for_inference(model, where=_CONVERTIBLE)
    got = np.asarray(sparse(_x(jnp.bfloat16)), np.float32)
    want = np.asarray(model(_x(jnp.bfloat16)), np.float32)
    assert sparse(_x(jnp.bfloat16)).dtype == jnp.bfloat16
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())


def test_size_report_counts_packed_bytes():
    model = _nm_net(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    sparse, report = sparsify_for_inference(model, where=_CONVERTIBLE)
    packed = {r.path: r for r in report.layers}
    assert set(packed) == {"layers/0", "layers/1", "pointwise"}
    # bf16 2:4: 16 bits x 2 values per 4 weights, plus one 16-bit index word per slot and
    # output unit for each 8 groups (K=16 has 4 groups: the word is half used); layers/1
    # (K=32, 8 groups) fills its words: 9/16 of dense
    assert packed["layers/0"].dense_bytes == 16 * 32 * 2
    assert packed["layers/0"].packed_bytes == 16 * 32 * 2 // 2 + 2 * 32 * 2
    assert packed["layers/1"].packed_bytes == 32 * 8 * 2 * 9 // 16
    assert report.compression == pytest.approx(report.dense_bytes / report.packed_bytes)
    saved = report.dense_bytes - report.packed_bytes
    assert report.model_bytes_before - report.model_bytes_after == saved
    assert "layers/0" in str(report) and f"{report.compression:.2f}x" in str(report)


def test_strict_conversion_names_the_offending_layer():
    model = _nm_net()
    with pytest.raises(ValueError, match=r"'head' \(Linear, kernel \(4, 3\)\).*3 of 3 groups"):
        sparsify_for_inference(model)
    with pytest.raises(ValueError, match=r"'spatial'.*kernel_size \(3, 3\) is not 1x1"):
        sparsify_for_inference(model, where=lambda path, layer: path != "head")
    model.layers[1].kernel[...] = jnp.ones_like(model.layers[1].kernel[...])
    with pytest.raises(ValueError, match=r"'layers/1'.*not 2:4: 64 of 64 groups"):
        sparsify_for_inference(model, where=_CONVERTIBLE)
    sparse, report = sparsify_for_inference(model, strict=False)
    status = {r.path: r.status for r in report.layers}
    assert status["layers/0"] == "packed"
    assert status["layers/1"].startswith("skipped: not 2:4")
    assert status["head"] == "skipped: not 2:4: 3 of 3 groups have more than 2 nonzeros"
    assert status["spatial"] == "skipped: kernel_size (3, 3) is not 1x1"
    assert isinstance(sparse.layers[1], nnx.Linear)
    np.testing.assert_allclose(sparse(_x()), model(_x()), rtol=1e-5, atol=1e-6)


def test_interpret_kernel_layer_matches_the_masked_dense_layer():
    """The Mosaic GPU kernel (in its interpreter) inside a converted bf16 layer: bit-exact
    against the masked dense layer on small-integer data (exact float32 sums)."""
    layer = nnx.Linear(512, 64, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.integers(-3, 4, (512, 64)), jnp.float32)
    layer.kernel[...] = jnp.where(nm_mask(k), k, 0)
    layer.bias[...] = jnp.asarray(rng.integers(-3, 4, (64,)), jnp.float32)
    ker, report = sparsify_for_inference(layer, implementation="interpret")
    assert ker.values.dtype == jnp.bfloat16  # packed in the layer's compute dtype
    x = jnp.asarray(rng.integers(-3, 4, (3, 512)), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(ker(x), np.float32), np.asarray(layer(x), np.float32))


def test_orbax_round_trip_of_the_packed_model(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    sparse, _ = sparsify_for_inference(_nm_net(seed=3), where=_CONVERTIBLE)
    state = nnx.state(sparse)
    path = tmp_path / "packed"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, state)
    checkpointer.wait_until_finished()

    # restore target: the same conversion of a fresh (abstract) model
    abstract = nnx.eval_shape(
        lambda: sparsify_for_inference(_nm_net(seed=9), where=_CONVERTIBLE)[0]
    )
    graphdef, abstract_state = nnx.split(abstract)
    restored_state = checkpointer.restore(path, abstract_state)
    restored = nnx.merge(graphdef, restored_state)
    meta = restored.layers[0].meta
    assert isinstance(meta, NMMeta) and meta[...].dtype == jnp.uint32  # float32 values
    np.testing.assert_array_equal(meta[...], sparse.layers[0].meta[...])
    assert isinstance(restored.layers[0].packed, PackedNM)
    np.testing.assert_array_equal(restored(_x()), sparse(_x()))


def test_bad_arguments_are_rejected():
    with pytest.raises(TypeError, match="model must be an nnx.Module"):
        sparsify_for_inference({"kernel": jnp.zeros((4, 4))})
    with pytest.raises(ValueError, match="n must satisfy"):
        sparsify_for_inference(_nm_net(), n=4, m=4)
    with pytest.raises(TypeError, match="packed must be a PackedNM"):
        NMLinear(jnp.zeros((4, 4)))


def test_kernels_import_is_flax_free_until_an_nnx_name_is_used():
    code = (
        "import sys, jaxcompress.kernels as K\n"
        "assert 'flax' not in sys.modules, 'import jaxcompress.kernels loaded flax'\n"
        "assert K.sparsify_for_inference.__module__ == 'jaxcompress.kernels._nnx'\n"
        "assert 'flax' in sys.modules\n"
        "try:\n"
        "    K.not_a_name\n"
        "except AttributeError as e:\n"
        "    assert 'not_a_name' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.gpu
def test_gpu_converted_layer_is_bit_exact_with_the_kernel_and_the_dispatcher():
    from jaxcompress.kernels._common import is_hopper

    assert is_hopper(), "the gpu tests need an H100/H200"
    # no bias: XLA may add a bias in a GEMM's float32 epilogue, before the bf16 rounding
    kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, use_bias=False)
    layer = nnx.Linear(4096, 4096, **kw, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    k = jnp.asarray(rng.integers(-3, 4, (4096, 4096)), jnp.bfloat16)
    layer.kernel[...] = jnp.where(nm_mask(k), k, 0)
    x = jnp.asarray(rng.integers(-3, 4, (4, 4096)), jnp.bfloat16)
    want = np.asarray(layer(x), np.float32)
    for implementation in ("mosaic", None):
        sparse, _ = sparsify_for_inference(layer, implementation=implementation)
        np.testing.assert_array_equal(np.asarray(sparse(x), np.float32), want)


def test_converted_2_4_gpt_decodes_like_the_masked_dense_gpt():
    # A transformer LM end to end: every block kernel 2:4 along `in`, converted, then decoded
    # with the key/value cache (each step a (B, d) row per packed weight).
    from jaxcompress.models import GPT, generate

    model = GPT(13, context=12, d_model=16, num_heads=2, num_layers=2, rngs=nnx.Rngs(0))
    for _, layer in nnx.iter_graph(model):
        if isinstance(layer, nnx.Linear):
            layer.kernel[...] = layer.kernel[...] * nm_mask(layer.kernel[...], 2, 4)
    sparse, report = sparsify_for_inference(model)
    assert len(report.layers) == 12 and all(r.status == "packed" for r in report.layers)
    assert report.packed_bytes < 0.6 * report.dense_bytes  # float32 2:4: values + index words
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 13, (2, 3)), jnp.int32)
    np.testing.assert_allclose(sparse(prompt), model(prompt), atol=1e-5, rtol=1e-5)
    cache = sparse.init_cache(2)
    logits, cache = sparse.extend(prompt, cache, 0)
    np.testing.assert_allclose(logits, model(prompt), atol=1e-5, rtol=1e-5)
    key = jax.random.key(0)
    np.testing.assert_array_equal(
        generate(sparse, prompt, 9, key, 0.0), generate(model, prompt, 9, key, 0.0)
    )


def test_batch_converts_only_the_layers_the_policy_runs_on_the_kernel(tmp_path, monkeypatch):
    import json
    import types

    kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    model = nnx.Sequential(nnx.Linear(512, 512, **kw), nnx.Linear(512, 12, **kw))
    for layer in model.layers:
        layer.kernel[...] = layer.kernel[...] * nm_mask(layer.kernel[...]).astype(jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (3, 512), jnp.bfloat16)

    # on this CPU the policy is dense everywhere: batch= keeps the model as it is
    sparse, report = sparsify_for_inference(model, batch=1)
    assert [r.status.split(":")[0] for r in report.layers] == ["kept dense"] * 2
    assert "at batch 1 on 'cpu'" in report.layers[0].status
    assert report.packed_bytes == 0 and report.model_bytes_after == report.model_bytes_before
    assert all(type(layer) is nnx.Linear for layer in sparse.layers)
    np.testing.assert_array_equal(sparse(x), model(x))

    # a (fake) measured Hopper: the kernel for 512x512 up to batch 8; 512x12 has no tiling
    entry = {"k": 512, "n": 512, "dtype": "bfloat16", "nm": "2:4", "max_batch": 8}
    policy = {"devices": {"Fake H100": {"mode": "table", "entries": [entry]}}}
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    monkeypatch.setenv("JAXCOMPRESS_NM_POLICY", str(tmp_path / "policy.json"))
    gpu = types.SimpleNamespace(platform="gpu", device_kind="Fake H100", compute_capability="9.0")
    sparse, report = sparsify_for_inference(model, batch=8, device=gpu)
    assert [r.status.split(":")[0] for r in report.layers] == ["packed", "kept dense"]
    assert isinstance(sparse.layers[0], NMLinear) and type(sparse.layers[1]) is nnx.Linear
    np.testing.assert_allclose(
        np.asarray(sparse(x), np.float32), np.asarray(model(x), np.float32), rtol=2e-2, atol=2e-2
    )
    _, report = sparsify_for_inference(model, batch=9, device=gpu)
    assert [r.status.split(":")[0] for r in report.layers] == ["kept dense"] * 2

    with pytest.raises(ValueError, match="batch must be an int >= 1 or None, got batch=0"):
        sparsify_for_inference(model, batch=0)
    with pytest.raises(ValueError, match="implementation='xla' overrides"):
        sparsify_for_inference(model, batch=1, implementation="xla")
    with pytest.raises(ValueError, match="device= is only used with batch="):
        sparsify_for_inference(model, device=gpu)
