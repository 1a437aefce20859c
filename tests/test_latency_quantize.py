"""Bit-level gates (jc.latency.quantize / Quantized) on any model, against an independent
round-to-nearest oracle and hand counts of bit-weighted multiply-adds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxcompress as jc
import jaxcompress.latency as L
from tests.structured_models import ConvNeXtNet, numpy_init


def _oracle(w, m):
    """q_m(w) = s_m round(w / s_m), s_m = max|w| / 2^(m-1) (float32, round half to even)."""
    w = np.asarray(w, np.float32)
    s = np.float32(np.abs(w).max()) / np.float32(2.0 ** (m - 1))
    return (s * np.round(w / s)).astype(np.float32)


def _oracle_gated(w, alpha):
    """sum_k alpha_k (q_k(w) - q_{k-1}(w)), q_0 = 0."""
    out, prev = np.zeros_like(np.asarray(w, np.float32)), 0.0
    for k, a in enumerate(np.asarray(alpha, np.float32), start=1):
        q = _oracle(w, k)
        out = out + a * (q - prev)
        prev = q
    return out


class _Lin(nnx.Module):
    """``x @ kernel``: on the identity its output is the (quantized) kernel itself."""

    def __init__(self, n, m, seed=0):
        self.kernel = nnx.Param(jnp.asarray(np.random.default_rng(seed).normal(size=(n, m))))

    def __call__(self, x):
        return x @ self.kernel[...]


def _set(q, name, values):
    q.gates[name][...] = jnp.asarray(values, jnp.float32)


def _drop_channels(q, rng, p):
    """Random channel gates in [0.2, 1) on ``q.model`` (a ``Gated``), each 0 with chance ``p``."""
    for gt in q.model.gates.values():
        a = rng.uniform(0.2, 1.0, gt.shape[0])
        a[rng.uniform(size=a.size) < p] = 0.0
        gt[...] = jnp.asarray(a, jnp.float32)


def _mlp(hidden=(32, 16)):
    model = jc.models.MLP(hidden=hidden, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 28, 28, 1))
    return model, x


def _with_kernels(model, q, fn):
    """A copy of ``model`` with every quantized kernel ``w`` replaced by ``fn(name, w)``."""
    copy = nnx.clone(model)
    for name, path in q.kernels.items():
        node = copy
        for key in path[:-1]:
            node = node[key] if isinstance(key, int) else getattr(node, key)
        var = getattr(node, path[-1])
        var[...] = jnp.asarray(fn(name, np.asarray(var[...])), var[...].dtype)
    return copy


# ---------------------------------------------------------------------------------------------
# The quantizer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [1, 3, 8, 16])
def test_first_m_levels_are_the_m_level_round_to_nearest_quantizer(levels):
    model = _Lin(12, 7)
    eye = jnp.eye(12)
    q = L.quantize(model, eye, levels=levels)
    (name,) = q.gates
    w = np.asarray(model.kernel[...])
    for m in range(1, levels + 1):
        _set(q, name, [1.0] * m + [0.0] * (levels - m))
        got = np.asarray(q(eye))
        want = _oracle(w, m)
        scale = np.abs(w).max()
        np.testing.assert_allclose(got, want, rtol=0, atol=4e-7 * scale)
        assert len(np.unique(np.round(want / (scale / 2 ** (m - 1))))) <= 2**m + 1
    # the forward pass restores the latent kernel
    np.testing.assert_array_equal(np.asarray(model.kernel[...]), w)
    # arbitrary gates: the gated sum of the residual planes
    alpha = np.random.default_rng(1).uniform(0, 2, levels)
    _set(q, name, alpha)
    np.testing.assert_allclose(q(eye), _oracle_gated(w, alpha), rtol=1e-5, atol=1e-6)


def test_straight_through_gradient_reaches_the_latent_kernel():
    model = _Lin(6, 5)
    x = jax.random.normal(jax.random.key(0), (3, 6))
    r = jax.random.normal(jax.random.key(1), (3, 5))
    q = L.quantize(model, x, levels=4)
    (name,) = q.gates
    alpha = np.array([0.7, 1.0, 0.5, 0.2], np.float32)
    _set(q, name, alpha)

    grads = nnx.grad(lambda m: jnp.sum(m(x) * r), argnums=nnx.DiffState(0, nnx.Param))(q)
    dw = np.asarray(x).T @ np.asarray(r)  # dL/dW for L = sum((x W) * r)
    np.testing.assert_allclose(grads["model"]["kernel"][...], alpha[0] * dw, rtol=1e-5, atol=1e-6)
    w, prev, want = np.asarray(model.kernel[...]), 0.0, []
    for k in range(1, 5):
        plane = _oracle(w, k) - prev
        prev = _oracle(w, k)
        want.append(np.sum(plane * dw))
    np.testing.assert_allclose(grads["gates"][name][...], want, rtol=1e-4, atol=1e-5)


def _models():
    mlp, x_mlp = _mlp()
    cnn = jc.models.SmallCNN(widths=(8, 16), rngs=nnx.Rngs(0))
    x_cnn = jax.random.normal(jax.random.key(2), (2, 28, 28, 1))
    cnx = numpy_init(lambda: ConvNeXtNet(rngs=nnx.Rngs(0)))
    x_cnx = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    return {"mlp": (mlp, x_mlp), "cnn": (cnn, x_cnn), "convnext": (cnx, x_cnx)}


@pytest.mark.parametrize("case", ["mlp", "cnn", "convnext"])
def test_all_gates_one_is_the_model_with_every_kernel_quantized(case):
    model, x = _models()[case]
    levels = 5
    q = L.quantize(model, x, levels=levels)
    # every kernel a dot_general/conv reads is quantized, nothing else
    kinds = {path[-1] for path in q.kernels.values()}
    assert kinds == {"kernel"}, q.kernels
    n_kernels = sum(1 for p, _ in nnx.iter_graph(model) if p and p[-1] == "kernel")
    assert len(q.kernels) == n_kernels
    want = _with_kernels(model, q, lambda _, w: _oracle(w, levels))(x)
    np.testing.assert_allclose(q(x), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(model(x), want, atol=1e-3)  # quantization changes the function
    # mixed bit-widths: extraction is exact and its bit-MACs are the polynomial's
    rng = np.random.default_rng(0)
    for n in q.gates:
        a = np.sort(rng.uniform(0.1, 1.0, levels))[::-1]
        a[rng.integers(1, levels + 1) :] = 0.0
        _set(q, n, a)
    ext = L.extract(q, x)
    assert type(ext.model) is type(model)
    np.testing.assert_allclose(ext.model(x), q(x), rtol=1e-5, atol=1e-5)
    assert ext.macs == q.macs(ext.kept)
    # select chooses kernels by path
    first = next(iter(q.kernels.values()))
    only = L.quantize(model, x, levels=levels, select=lambda path, var: path == first)
    assert list(only.kernels.values()) == [first]


def test_composes_with_channel_gates_and_both_families_get_gradients():
    model, x = _mlp()
    g = L.gated(model, x)
    q = L.quantize(g, x, levels=4)
    assert set(q.macs.sizes) == set(g.gates) | set(q.gates)
    rng = np.random.default_rng(0)
    bits = {n: rng.uniform(0, 1, 4) for n in q.gates}
    chans = {n: rng.uniform(0, 1, gt.shape[0]) for n, gt in g.gates.items()}
    for n, a in bits.items():
        _set(q, n, a)
    for n, a in chans.items():
        g.gates[n][...] = jnp.asarray(a, jnp.float32)

    def kernel(i):  # oracle: gated quantized kernel, input rows scaled by the channel gates
        w = _oracle_gated(np.asarray(model.layers[i].kernel[...]), bits[f"layers/{i}/kernel:bits"])
        return w if i == 0 else chans[f"layers/{i - 1}"][:, None] * w

    h = np.asarray(x).reshape(x.shape[0], -1)
    for i in range(3):
        h = h @ kernel(i) + np.asarray(model.layers[i].bias[...])
        h = np.maximum(h, 0) if i < 2 else h
    np.testing.assert_allclose(q(x), h, rtol=1e-4, atol=1e-4)

    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, nnx.Param))(q)
    assert all(np.abs(grads["gates"][n][...]).sum() > 0 for n in q.gates)
    assert all(np.abs(grads["model"]["gates"][n][...]).sum() > 0 for n in g.gates)


def test_channel_and_bit_gates_extract_exactly_on_a_batchnorm_cnn():
    model, x = _models()["cnn"]
    model.eval()
    q = L.quantize(L.gated(model, x), x, levels=4)
    rng = np.random.default_rng(1)
    for n in q.gates:
        a = np.sort(rng.uniform(0.2, 1.0, 4))[::-1]
        a[rng.integers(1, 5) :] = 0.0
        _set(q, n, a)
    _drop_channels(q, rng, 0.3)
    ext = L.extract(q, x)
    assert type(ext.model) is type(model)
    assert any(ext.kept[n] < gt.shape[0] for n, gt in q.model.gates.items())
    np.testing.assert_allclose(ext.model(x), q(x), rtol=1e-4, atol=1e-4)
    assert ext.macs == q.macs(ext.kept) < q.macs.dense


# ---------------------------------------------------------------------------------------------
# Cost and extraction
# ---------------------------------------------------------------------------------------------


def _hand_bit_macs(h0, h1, b0, b1, b2):
    return b0 * 784 * h0 + b1 * h0 * h1 + b2 * h1 * 10


def test_bit_macs_equal_the_hand_count_for_random_bit_widths():
    model, x = _mlp()
    q = L.quantize(model, x, levels=8)
    names = [f"layers/{i}/kernel:bits" for i in range(3)]
    assert sorted(q.gates) == names
    assert q.macs.dense == 8 * (784 * 32 + 32 * 16 + 16 * 10)
    rng = np.random.default_rng(0)
    for _ in range(5):
        b = [int(v) for v in rng.integers(1, 9, 3)]
        assert q.macs(dict(zip(names, b, strict=True))) == _hand_bit_macs(32, 16, *b)
    # with channel gates: polynomial in both
    qg = L.quantize(L.gated(model, x), x, levels=8)
    kept = {"layers/0": 20, "layers/1": 5, names[0]: 3, names[1]: 8, names[2]: 2}
    assert qg.macs(kept) == _hand_bit_macs(20, 5, 3, 8, 2)
    # relaxed counts: differentiable
    grad = jax.grad(lambda c: qg.macs(c))({n: jnp.float32(2.5) for n in names})
    np.testing.assert_allclose(grad[names[1]], 32 * 16)
    # an op reading no quantized kernel counts at `levels` bits
    q0 = L.quantize(model, x, levels=8, select=lambda path, var: path[1] == 0)
    assert q0.macs({names[0]: 3}) == _hand_bit_macs(32, 16, 3, 8, 8)
    # the regularizer accepts it like any MacCount
    ones = {n: jnp.ones(8) for n in names}
    np.testing.assert_allclose(L.regularizer(ones, q.macs), 1.0, rtol=1e-6)


def test_extraction_is_exact_with_mixed_bit_widths_and_channels():
    model, x = _mlp()
    q = L.quantize(L.gated(model, x), x, levels=6)
    rng = np.random.default_rng(3)
    plans = {"layers/0/kernel:bits": 2, "layers/1/kernel:bits": 6, "layers/2/kernel:bits": 4}
    for n, b in plans.items():
        a = rng.uniform(0.5, 1.0, 6)
        a[b:] = rng.uniform(0, 1e-3, 6 - b)  # below tau * max: dropped
        a[b - 1] = 0.6  # the last kept level
        _set(q, n, a)
    _drop_channels(q, rng, 0.4)
    ext = L.extract(q, x)
    assert ext.bits == plans
    assert type(ext.model) is type(model)
    h0, h1 = ext.kept["layers/0"], ext.kept["layers/1"]
    assert ext.model.layers[0].kernel.shape == (784, h0)
    assert ext.macs == _hand_bit_macs(h0, h1, 2, 6, 4) == q.macs(ext.kept)
    ref = nnx.clone(q)
    for n, b in plans.items():
        ref.gates[n][...] = ref.gates[n][...].at[b:].set(0.0)
    np.testing.assert_allclose(ext.model(x), ref(x), rtol=1e-5, atol=1e-5)
    # the extracted kernel holds the b-level quantizer (times the kept gates) of the latent one
    w = np.asarray(model.layers[2].kernel[...])
    a = np.asarray(ref.gates["layers/2/kernel:bits"][...])
    keep1 = ext.keep["layers/1"]
    want = np.asarray(q.model.gates["layers/1"][...])[keep1][:, None] * _oracle_gated(w, a)[keep1]
    np.testing.assert_allclose(ext.model.layers[2].kernel[...], want, rtol=1e-5, atol=1e-6)
    # without channel gates: the same classes and shapes, kernels quantized
    q2 = L.quantize(model, x, levels=3)
    _set(q2, "layers/1/kernel:bits", [1.0, 0.0, 0.0])
    ext2 = L.extract(q2, x)
    assert ext2.bits == {"layers/0/kernel:bits": 3, "layers/1/kernel:bits": 1,
                         "layers/2/kernel:bits": 3}  # fmt: skip
    np.testing.assert_allclose(ext2.model(x), q2(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        ext2.model.layers[1].kernel[...], _oracle(np.asarray(model.layers[1].kernel[...]), 1)
    )
    assert ext2.macs == _hand_bit_macs(32, 16, 3, 1, 3)


# ---------------------------------------------------------------------------------------------
# Training with the surrogate
# ---------------------------------------------------------------------------------------------


def _train(q, x, target, tx, steps):
    """``steps`` of ``tx`` on ``1000 * mse(q(x), target)`` (distillation: the loss wants
    precision, the penalty bits), one jitted step; returns the state and the trace count."""
    graphdef, params, rest = nnx.split(q, nnx.Param, ...)
    traces = []

    @jax.jit
    def step(params, rest, opt_state):
        traces.append(1)

        def loss(p):
            return 1000.0 * jnp.mean((nnx.merge(graphdef, p, rest)(x) - target) ** 2)

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for _ in range(steps):
        params, opt_state = step(params, rest, opt_state)
    nnx.update(q, params)
    return opt_state, len(traces)


def test_surrogate_and_controller_drive_the_bit_cost_to_the_target_in_one_compile():
    model = jc.models.MLP(in_features=16, hidden=(24,), num_classes=4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (64, 16))
    target = model(x)
    # decreasing start: the ratio removes the finest levels first
    q = L.quantize(model, x, levels=8, init=np.linspace(1.0, 0.9, 8))
    macs = q.macs
    ctrl = L.lambda_controller(0.5 * macs.dense, macs, lam0=0.05, gain=0.02)
    tx = optax.chain(L.surrogate_penalty(macs, ctrl), optax.adam(3e-3), L.project_nonnegative())
    opt_state, n_traces = _train(q, x, target, tx, 2000)
    assert n_traces == 1
    gates = {n: np.asarray(g[...]) for n, g in q.gates.items()}
    landed = float(L.regularizer(gates, macs))
    assert abs(landed - 0.5) < 0.05 * 0.5, landed
    np.testing.assert_allclose(opt_state[0].value, landed, rtol=1e-2)
    for a in gates.values():  # non-negative and nested
        assert a.min() >= 0 and np.all(np.diff(a) <= 0), a
    ext = L.extract(q, x)
    assert ext.macs == macs(ext.kept)
    assert abs(ext.macs / macs.dense - 0.5) < 0.15, ext.bits


def test_projection_keeps_bit_gates_nonnegative_and_nested():
    model, x = _mlp()
    q = L.quantize(L.gated(model, x), x, levels=5)
    _set(q, "layers/0/kernel:bits", [1.0, 0.2, 0.9, 0.5, 0.7])
    params = nnx.state(q, nnx.Param)
    updates = jax.tree.map(jnp.zeros_like, params)
    updates["gates"]["layers/1/kernel:bits"][...] = jnp.asarray([0.0, -2.0, 0.0, 0.0, 0.0])
    updates["model"]["gates"]["layers/0"][...] = -jnp.linspace(0.0, 2.0, 32)
    tx = L.project_nonnegative()
    new = optax.apply_updates(params, jax.jit(tx.update)(updates, tx.init(params), params)[0])
    gates = new["gates"]
    np.testing.assert_allclose(gates["layers/0/kernel:bits"][...], [1.0, 0.2, 0.2, 0.2, 0.2])
    np.testing.assert_allclose(gates["layers/1/kernel:bits"][...], [1.0, 0.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(gates["layers/2/kernel:bits"][...], np.ones(5))
    # channel gates: only clipped at 0, in any order
    want = np.maximum(1.0 - np.linspace(0.0, 2.0, 32), 0.0)
    np.testing.assert_allclose(new["model"]["gates"]["layers/0"][...], want, atol=1e-6)
    # with prune_below, the cut levels are a suffix
    tx = L.project_nonnegative(prune_below=0.3)
    new = optax.apply_updates(params, tx.update(updates, tx.init(params), params)[0])
    np.testing.assert_allclose(new["gates"]["layers/0/kernel:bits"][...], [1.0, 0, 0, 0, 0])


def test_active_feedback_counts_the_bit_widths_extraction_keeps():
    model, x = _mlp()
    q = L.quantize(L.gated(model, x), x, levels=6)
    _set(q, "layers/0/kernel:bits", [1.0, 0.0, 0.5, 0.0, 0.0, 0.0])  # 2 active, 3 bits
    _set(q, "layers/2/kernel:bits", [0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # at least 1 bit
    q.model.gates["layers/1"][...] = jnp.asarray(np.arange(16) % 2, jnp.float32)
    params = nnx.state(q, nnx.Param)
    tx = L.surrogate_penalty(q.macs, 0.1, feedback="active")
    _, state = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    ext = L.extract(q, x)
    assert ext.bits == {"layers/0/kernel:bits": 3, "layers/1/kernel:bits": 6,
                        "layers/2/kernel:bits": 1}  # fmt: skip
    np.testing.assert_allclose(state.value, ext.macs / q.macs.dense, rtol=1e-6)
    assert ext.macs == _hand_bit_macs(32, 8, 3, 6, 1)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_input_is_refused_with_the_argument_named():
    model, x = _mlp()
    for bad in (0, 17, 2.0, True, "8"):
        with pytest.raises(ValueError, match=rf"levels must be an int in \[1, 16\], got {bad!r}"):
            L.quantize(model, x, levels=bad)
    with pytest.raises(TypeError, match="select must be callable"):
        L.quantize(model, x, select="kernel")
    with pytest.raises(ValueError, match="no kernel of MLP selected"):
        L.quantize(model, x, select=lambda path, var: False)
    for bad in (-1.0, [1.0, 0.5], [1.0, np.nan, 0.5, 0.2], "1"):
        with pytest.raises(ValueError, match="init must be"):
            L.quantize(model, x, levels=4, init=bad)
    start = [1.0, 0.9, 0.8, 0.7]
    q = L.quantize(model, x, levels=4, init=start)
    assert all(np.allclose(g[...], start) for g in q.gates.values())
    with pytest.raises(TypeError, match="model must be a flax.nnx.Module"):
        L.quantize(lambda v: v, x)
    with pytest.raises(ValueError, match="at least one example input"):
        L.quantize(model)
    q = L.quantize(model, x, levels=4)
    with pytest.raises(TypeError, match="already Quantized"):
        L.quantize(q, x)
    _set(q, "layers/1/kernel:bits", [1.0, -0.5, 0.0, 0.0])
    with pytest.raises(
        ValueError, match=r"gates\['layers/1/kernel:bits'\] must be finite and >= 0"
    ):
        L.extract(q, x)
    _set(q, "layers/1/kernel:bits", [1.0, 0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="no channel gates"):
        L.extract(q, x, policy=L.round_to_multiple(4))
    with pytest.raises(TypeError, match="cost must be"):
        L.regularizer({n: g[...] for n, g in q.gates.items()}, 3.0)
