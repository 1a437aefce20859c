"""Extraction of plain models from gated ones (jaxcompress.latency.extract)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxcompress.latency as L
from jaxcompress.models import MLP, SmallCNN, TransformerClassifier
from jaxcompress.train import eval_view, fit, train_view


def _set_gates(model, zero_frac=0.4, seed=0):
    """Random positive gates with about ``zero_frac`` of every group set exactly to 0."""
    rng = np.random.default_rng(seed)
    values = {}
    for name, a in L.gate_values(model).items():
        v = rng.uniform(0.2, 2.0, a.shape).astype(np.float32)
        n_zero = int(round(zero_frac * a.shape[0]))
        v[rng.permutation(a.shape[0])[:n_zero]] = 0.0
        values[name] = v
    for path, var in nnx.iter_graph(model):
        if isinstance(var, L.Gate):
            var[...] = jnp.asarray(values["/".join(str(p) for p in path)])
    return values


def _randomize_bn(model, seed=1):
    rng = np.random.default_rng(seed)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.BatchNorm):
            n = node.scale.shape[0]
            node.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)
            node.bias[...] = jnp.asarray(rng.normal(size=n), jnp.float32)
            node.mean[...] = jnp.asarray(rng.normal(size=n), jnp.float32)
            node.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)


def _fwd(model, x, train=False):
    """One jitted forward pass (eager NNX calls dispatch op by op, which is slower on CPU)."""
    graphdef, state = nnx.split(train_view(model) if train else eval_view(model))
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)


def _expected_widths(values, tau=L.DEFAULT_TAU):
    return {k: int(len(L.kept_units(v, tau))) for k, v in values.items()}


@pytest.mark.parametrize("normalize_last", [False, True])
def test_cnn_extraction_is_exact_in_eval_mode(normalize_last):
    model = L.GatedCNN(
        1, 10, (6, 8, 8, 12), strides=(1, 1, 2, 1), normalize_last=normalize_last,
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    _randomize_bn(model)
    values = _set_gates(model)
    x = jax.random.normal(jax.random.key(1), (4, 12, 12, 1))
    out = L.extract(model, input_shape=(12, 12, 1))
    assert out.model.strides == (1, 1, 2, 1)
    assert isinstance(out.model, SmallCNN)
    assert out.widths == _expected_widths(values)
    assert out.model.widths == tuple(out.widths[f"blocks/{i}/gate/alpha"] for i in range(4))
    np.testing.assert_allclose(_fwd(out.model, x), _fwd(model, x), rtol=1e-5, atol=1e-5)
    graph = L.cost_graph(model, (12, 12, 1))
    assert out.macs == graph.macs(out.widths) == L.count_macs(out.model, (12, 12, 1))
    assert out.macs < graph.dense()


def test_normalized_last_gates_remove_the_logit_temperature():
    model = L.GatedCNN(1, 10, (4, 6), normalize_last=True, rngs=nnx.Rngs(0))
    assert [b.normalize for b in model.blocks] == [False, True]
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 1))
    gate = model.blocks[1].gate.alpha
    gate[...] = jnp.linspace(0.1, 1.0, 6)
    before = _fwd(model, x)
    gate[...] = 7.0 * gate[...]  # a common scale changes nothing
    np.testing.assert_allclose(_fwd(model, x), before, rtol=1e-5, atol=1e-6)
    plain = L.GatedCNN(1, 10, (4, 6), rngs=nnx.Rngs(0))
    plain.blocks[1].gate.alpha[...] = jnp.linspace(0.1, 1.0, 6)
    scaled = _fwd(plain, x)
    plain.blocks[1].gate.alpha[...] = 7.0 * plain.blocks[1].gate.alpha[...]
    assert not np.allclose(_fwd(plain, x), scaled, rtol=1e-3)  # without it, it does
    np.testing.assert_allclose(L.gate_rms(jnp.array([3.0, 4.0])), np.sqrt(12.5 + 1e-12), rtol=1e-6)
    with pytest.raises(TypeError, match="normalize_last must be a bool"):
        L.GatedCNN(1, 10, (4, 6), normalize_last=1, rngs=nnx.Rngs(0))


def test_mlp_extraction_is_exact():
    model = L.GatedMLP(20, (16, 12), 5, rngs=nnx.Rngs(0))
    values = _set_gates(model, 0.5)
    x = jax.random.normal(jax.random.key(2), (7, 20))
    out = L.extract(model, input_shape=(20,))
    assert isinstance(out.model, MLP)
    assert out.model.hidden == (out.widths["gates/0/alpha"], out.widths["gates/1/alpha"])
    assert out.widths == _expected_widths(values)
    np.testing.assert_allclose(_fwd(out.model, x), _fwd(model, x), rtol=1e-5, atol=1e-5)
    assert out.macs == 20 * out.model.hidden[0] + out.model.hidden[0] * out.model.hidden[1] + (
        out.model.hidden[1] * 5
    )


def test_lowrank_extraction_is_exact():
    model = L.GatedMLP(20, (16, 12), 5, ranks=(6, 4), rngs=nnx.Rngs(0))
    values = _set_gates(model, 0.5, seed=3)
    x = jax.random.normal(jax.random.key(3), (7, 20))
    out = L.extract(model, input_shape=(20,))
    assert isinstance(out.model, L.FactorizedMLP)
    assert out.widths == _expected_widths(values)
    assert out.model.ranks == (out.widths["layers/0/alpha"], out.widths["layers/1/alpha"])
    np.testing.assert_allclose(_fwd(out.model, x), _fwd(model, x), rtol=1e-5, atol=1e-5)
    h0, h1 = out.model.hidden
    r0, r1 = out.model.ranks
    assert out.macs == (20 + h0) * r0 + (h0 + h1) * r1 + h1 * 5

    layer = L.LowRankLinear(9, 7, 5, rngs=nnx.Rngs(1))
    layer.alpha[...] = jnp.array([0.5, 0.0, 2.0, 0.0, 1.0])
    small = L.extract(layer, input_shape=(9,))
    assert small.model.rank == 3 and small.macs == (9 + 7) * 3
    xs = jax.random.normal(jax.random.key(4), (3, 9))
    np.testing.assert_allclose(small.model(xs), layer(xs), rtol=1e-5, atol=1e-6)


def test_transformer_head_and_ffn_extraction_is_exact():
    model = L.GatedTransformerClassifier(
        50, 3, d_model=16, num_heads=4, num_layers=2, mlp_dim=24, max_len=10, rngs=nnx.Rngs(0)
    )
    values = _set_gates(model, 0.5, seed=4)
    tokens = jax.random.randint(jax.random.key(5), (3, 10), 1, 50)
    tokens = tokens.at[0, 6:].set(0)  # padding
    out = L.extract(model, input_shape=(10,))
    assert isinstance(out.model, L.SlimTransformerClassifier)
    assert out.widths == _expected_widths(values)
    assert out.model.heads == (2, 2)
    np.testing.assert_allclose(_fwd(out.model, tokens), _fwd(model, tokens), rtol=1e-5, atol=1e-5)
    graph = L.cost_graph(model, (10,))
    assert out.macs == graph.macs(out.widths) == L.count_macs(out.model, (10,))


def test_gated_transformer_has_transformer_classifier_api_and_cost():
    kw = dict(d_model=16, num_heads=4, num_layers=1, mlp_dim=24, max_len=10, dropout=0.0)
    gated = L.GatedTransformerClassifier(50, 3, **kw, rngs=nnx.Rngs(0))
    plain = TransformerClassifier(50, 3, **kw, rngs=nnx.Rngs(0))
    tokens = jnp.ones((2, 10), jnp.int32)
    assert _fwd(gated, tokens).shape == _fwd(plain, tokens).shape == (2, 3)
    assert L.count_macs(gated, (10,)) == L.count_macs(plain, (10,))
    with pytest.raises(ValueError, match="max_len"):
        gated(jnp.ones((2, 11), jnp.int32))


def test_bit_levels_extraction_and_prefix_quantizer():
    layer = L.BitGatedDense(6, 4, levels=6, rngs=nnx.Rngs(0))
    w = layer.kernel[...]
    layer.alpha[...] = jnp.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    # keeping the first m levels is the m-level round-to-nearest quantizer
    step = jnp.max(jnp.abs(w)) / 4.0
    np.testing.assert_allclose(layer.quantized_kernel(), step * jnp.round(w / step), atol=1e-6)
    layer.alpha[...] = jnp.array([1.0, 0.7, 0.0, 1.3, 0.0, 0.0])
    out = L.extract(layer, input_shape=(6,))
    assert isinstance(out.model, L.LevelDense) and out.model.bits == 3
    assert set(np.unique(np.asarray(out.model.codes[...]))) <= {-1, 0, 1}
    x = jax.random.normal(jax.random.key(0), (5, 6))
    np.testing.assert_array_equal(out.model(x), layer(x))
    graph = L.cost_graph(layer, (6,))
    assert graph.dense() == 24 and graph.macs(out.widths) == pytest.approx(24 * 3 / 6)


def test_threshold_removes_small_nonzero_gates():
    a = np.array([1.0, 5e-3, 0.02, 0.0, 0.5])
    np.testing.assert_array_equal(L.kept_units(a), [0, 2, 4])
    np.testing.assert_array_equal(L.kept_units(a, tau=0.0), [0, 1, 2, 4])
    np.testing.assert_array_equal(L.kept_units(np.zeros(3)), [0])  # never empty


def test_kept_units_rounds_up_to_a_multiple_with_the_largest_removed_gates():
    a = np.array([0.0, 0.9, 0.0, 0.4, 3e-3, 0.2, 0.0, 0.0, 0.05, 0.0, 0.0])
    np.testing.assert_array_equal(L.kept_units(a), [1, 3, 5, 8])
    # 4 survive; 8 = 4 + the largest removed (3e-3 at 4) + the lowest-index zeros 0, 2, 6
    np.testing.assert_array_equal(L.kept_units(a, multiple=8), [0, 1, 2, 3, 4, 5, 6, 8])
    np.testing.assert_array_equal(L.kept_units(a, multiple=4), [1, 3, 5, 8])  # already one
    assert len(L.kept_units(a, multiple=16)) == a.size  # capped at the group size
    np.testing.assert_array_equal(L.kept_units(np.zeros(5), multiple=2), [0, 1])
    for bad in (0, -8, 2.5, True, "8"):
        with pytest.raises(ValueError, match="multiple must be an int >= 1"):
            L.kept_units(a, multiple=bad)


@pytest.mark.parametrize("multiple", [4, {"blocks/1/gate/alpha": 8, "blocks/3/gate/alpha": 4}])
def test_cnn_extraction_rounded_to_a_multiple_is_exact(multiple):
    """Units added to reach a multiple have zero gates here: zero channels, same function."""
    model = L.GatedCNN(1, 10, (6, 16, 8, 12), strides=(1, 2, 2, 1), rngs=nnx.Rngs(0))
    _randomize_bn(model)
    for _, node in nnx.iter_graph(model):  # BN outputs mostly above the ReLU, as after training
        if isinstance(node, nnx.BatchNorm):
            node.mean[...] = jnp.zeros_like(node.mean[...])
            node.bias[...] = jnp.abs(node.bias[...]) + 0.5
    values = _set_gates(model, zero_frac=0.6, seed=3)
    x = jax.random.normal(jax.random.key(1), (4, 12, 12, 1))
    out = L.extract(model, multiple=multiple, input_shape=(12, 12, 1))
    multiples = (
        dict.fromkeys(values, multiple)
        if isinstance(multiple, int)
        else {k: multiple.get(k, 1) for k in values}
    )
    for name, a in values.items():
        plain = int(np.count_nonzero(a))
        m = multiples[name]
        assert out.widths[name] == min(a.size, -(-plain // m) * m)
        assert set(L.kept_units(a)) <= set(out.kept[name])  # every surviving unit is kept
    assert out.widths != _expected_widths(values)  # rounding added units
    np.testing.assert_allclose(_fwd(out.model, x), _fwd(model, x), rtol=1e-5, atol=1e-5)
    graph = L.cost_graph(model, (12, 12, 1))
    counts = L.active_counts(values, graph, multiple=multiple)
    assert {k: int(v) for k, v in counts.items()} == out.widths
    # the fill channels are alive (non-zero BN scale) but read through zero weights, so the
    # next layer's weights on them get a gradient and fine-tuning can use them
    small = out.model
    readers = [b.conv.kernel for b in small.blocks[1:]] + [small.head.kernel]
    fills = 0
    for i, block in enumerate(small.blocks):
        dead = values[f"blocks/{i}/gate/alpha"][out.kept[f"blocks/{i}/gate/alpha"]] == 0
        fills += int(dead.sum())
        assert np.all(np.asarray(block.bn.scale[...])[dead] != 0)
        w = np.asarray(readers[i][...])
        assert np.all((w[:, :, dead] if w.ndim == 4 else w[dead]) == 0)
    assert fills > 0
    graphdef, params, rest = nnx.split(eval_view(small), nnx.Param, ...)

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params, rest)(x) ** 2)

    grads = jax.grad(loss)(params)
    trainable = []  # per fill channel: does the next layer's weight on it get a gradient?
    for i in range(4):
        dead = values[f"blocks/{i}/gate/alpha"][out.kept[f"blocks/{i}/gate/alpha"]] == 0
        g = grads["blocks"][i + 1]["conv"]["kernel"] if i < 3 else grads["head"]["kernel"]
        g = np.abs(np.asarray(g[...]))
        per_channel = g.max(axis=(0, 1, 3)) if g.ndim == 4 else g.max(axis=1)
        trainable += list(per_channel[dead] > 0)
    assert len(trainable) == fills and all(trainable)
    assert out.macs == graph.macs(out.widths) == L.count_macs(out.model, (12, 12, 1))


def _mlp_with_gates(g0, g1):
    model = L.GatedMLP(8, (16, 16), 3, rngs=nnx.Rngs(0))
    model.gates[0].alpha[...] = jnp.asarray(g0, jnp.float32)
    model.gates[1].alpha[...] = jnp.asarray(g1, jnp.float32)
    return model


def _random_latency_model(graph, seed):
    """A latency model of ``graph`` with random (non-monotone) times on a 4-point grid."""
    rng = np.random.default_rng(seed)
    sizes = graph.group_sizes
    grids = {}
    for term in graph.terms:
        axes = tuple(
            np.unique(np.round(np.array([0.25, 0.5, 0.75, 1.0]) * sizes[g]).clip(1))
            for g in term.groups
        )
        times = rng.uniform(0.1, 1.0, tuple(a.shape[0] for a in axes))
        grids[term.name] = (term.groups, axes, times)
    return L.LatencyModel(graph, grids, overhead=0.1)


@pytest.mark.parametrize("seed", range(3))
def test_cnn_extraction_padded_to_the_fastest_widths_is_exact(seed):
    """Widening to where a (measured) latency model is fastest adds zero-gated channels only."""
    model = L.GatedCNN(1, 10, (8, 16, 8, 12), strides=(1, 2, 2, 1), rngs=nnx.Rngs(0))
    _randomize_bn(model)
    values = _set_gates(model, zero_frac=0.6, seed=3)
    graph = L.cost_graph(model, (12, 12, 1))
    timing = _random_latency_model(graph, seed)
    x = jax.random.normal(jax.random.key(1), (4, 12, 12, 1))
    rule = L.extract(model, input_shape=(12, 12, 1))
    out = L.extract(model, latency_model=timing, input_shape=(12, 12, 1))
    assert out.widths == timing.fastest_widths(rule.widths)
    for name in values:
        assert set(rule.kept[name]) <= set(out.kept[name])
        added = np.setdiff1d(out.kept[name], rule.kept[name])
        assert np.all(values[name][added] == 0)  # zero-padding, never a pruned live unit
    assert float(timing.latency(out.widths)) <= float(timing.latency(rule.widths)) * (1 + 1e-6)
    assert out.macs == graph.macs(out.widths) >= rule.macs
    np.testing.assert_allclose(_fwd(out.model, x), _fwd(model, x), rtol=1e-5, atol=1e-5)
    # a grid that only gets slower with width changes nothing
    slow = L.LatencyModel(
        graph,
        {n: (g, a, np.indices(t.shape).sum(axis=0) + 1.0) for n, (g, a, t) in timing.grids.items()},
    )
    assert L.extract(model, latency_model=slow, input_shape=(12, 12, 1)).widths == rule.widths


def test_padding_errors():
    model = L.GatedCNN(1, 10, (8, 16, 8, 12), rngs=nnx.Rngs(0))
    _set_gates(model)
    graph = L.cost_graph(model, (12, 12, 1))
    timing = _random_latency_model(graph, 0)
    with pytest.raises(TypeError, match="latency_model must be a LatencyModel, got LayerGraph"):
        L.extract(model, latency_model=graph)
    with pytest.raises(ValueError, match="cannot be combined"):
        L.extract(model, latency_model=timing, max_macs=1e6, input_shape=(12, 12, 1))
    other = L.GatedCNN(1, 10, (8, 16, 8, 16), rngs=nnx.Rngs(0))
    wrong = _random_latency_model(L.cost_graph(other, (12, 12, 1)), 0)
    with pytest.raises(ValueError, match="do not match the model's gates"):
        L.extract(model, latency_model=wrong)
    for bad in (-0.5, 1.0, "0.1"):
        with pytest.raises(ValueError, match="pad_min_gain must be a float in"):
            L.extract(model, latency_model=timing, pad_min_gain=bad)


def test_budget_rounding_drops_the_cheapest_gate_mass_per_mac():
    """Hand-computed: MLP 8 -> 16 -> 16 -> 3 costs 8 h0 + h0 h1 + 3 h1 = 432 MACs at (16, 16).
    Lowering h0 to 8 saves 192 MACs, h1 to 8 saves 152; the greedy step takes the smaller
    (dropped relative gate mass) / (MACs saved)."""
    big, small = np.ones(8), np.full(8, 0.25)
    # h0's 8 smallest relative gates sum to 4 (4/192 = 0.021), h1's to 2 (2/152 = 0.013)
    model = _mlp_with_gates(np.r_[big, np.full(8, 0.5)], np.r_[big, small])
    out = L.extract(model, multiple=8, max_macs=400, input_shape=(8,))
    assert out.model.hidden == (16, 8) and out.macs == 280
    np.testing.assert_array_equal(out.kept["gates/1/alpha"], np.arange(8))  # the largest 8
    # the other way round: h0 is now the cheaper gate mass per MAC saved
    model = _mlp_with_gates(np.r_[big, small], np.r_[big, np.full(8, 0.9)])
    out = L.extract(model, multiple=8, max_macs=400, input_shape=(8,))
    assert out.model.hidden == (8, 16) and out.macs == 240
    # a budget the rounded-up model already meets changes nothing
    plain = L.extract(model, multiple=8, input_shape=(8,))
    loose = L.extract(model, multiple=8, max_macs=plain.macs, input_shape=(8,))
    assert loose.widths == plain.widths
    for name in plain.kept:
        np.testing.assert_array_equal(loose.kept[name], plain.kept[name])


def test_budget_rounding_with_a_loss_criterion():
    # gate mass says drop h1 (see above); a loss that only cares about h1 says drop h0
    big, small = np.ones(8), np.full(8, 0.25)
    model = _mlp_with_gates(np.r_[big, np.full(8, 0.5)], np.r_[big, small])
    calls = []

    def loss(kept):
        calls.append({k: len(v) for k, v in kept.items()})
        return 16.0 - len(kept["gates/1/alpha"])

    out = L.extract(model, multiple=8, max_macs=400, budget_loss=loss, input_shape=(8,))
    assert out.model.hidden == (8, 16) and out.macs == 240
    assert calls[0] == {"gates/0/alpha": 16, "gates/1/alpha": 16}  # the start, then one per group
    assert len(calls) == 3


def test_calibration_loss_is_the_extracted_models_loss():
    model = L.GatedCNN(1, 10, (8, 16, 16, 24), strides=(2, 2, 2, 1), rngs=nnx.Rngs(0))
    _randomize_bn(model)
    values = _set_gates(model, zero_frac=0.0, seed=5)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(32, 12, 12, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 32))
    loss = L.calibration_loss(model, x, y)
    kept = {k: np.sort(rng.permutation(v.size)[: v.size // 2]) for k, v in values.items()}
    masked = {k: np.where(np.isin(np.arange(v.size), kept[k]), v, 0) for k, v in values.items()}
    small = L.extract(model, gates=masked).model
    expected = optax.softmax_cross_entropy_with_integer_labels(_fwd(small, x), y).mean()
    np.testing.assert_allclose(loss(kept), float(expected), rtol=1e-5)
    everything = {k: np.arange(v.size) for k, v in values.items()}
    full = optax.softmax_cross_entropy_with_integer_labels(_fwd(model, x), y).mean()
    np.testing.assert_allclose(loss(everything), float(full), rtol=1e-5)
    assert L.gate_values(model)["blocks/0/gate/alpha"].min() > 0  # the model is not changed


def test_budget_rounding_meets_every_budget_on_a_cnn():
    model = L.GatedCNN(1, 10, (32, 64, 64, 128), strides=(2, 2, 2, 1), rngs=nnx.Rngs(0))
    values = _set_gates(model, zero_frac=0.55, seed=4)
    graph = L.cost_graph(model, (28, 28, 1))
    rounded = L.extract(model, multiple=8, input_shape=(28, 28, 1))
    assert rounded.macs > graph.macs(_expected_widths(values))  # rounding up adds cost
    cheapest = graph.macs(dict.fromkeys(values, 8))  # every layer at 8 channels
    for budget in (0.3 * graph.dense(), 0.15 * graph.dense(), 0.08 * graph.dense(), cheapest):
        out = L.extract(model, multiple=8, max_macs=budget, input_shape=(28, 28, 1))
        assert out.macs <= budget and out.macs == graph.macs(out.widths)
        for name, a in values.items():
            assert out.widths[name] % 8 == 0 and out.widths[name] <= rounded.widths[name]
            kept = out.kept[name]
            # the kept units are the largest gates of the group
            assert a[kept].min() >= np.delete(a, kept).max(initial=0.0)
    with pytest.raises(ValueError, match="cheapest model with these multiples"):
        L.extract(model, multiple=8, max_macs=cheapest - 1, input_shape=(28, 28, 1))
    counts = L.fit_counts_to_budget(
        values, graph, rounded.widths, dict.fromkeys(values, 8), 0.1 * graph.dense()
    )
    assert graph.macs(counts) <= 0.1 * graph.dense()


def test_all_zero_group_keeps_one_unit_and_the_function():
    model = L.GatedMLP(8, (6,), 3, rngs=nnx.Rngs(0))
    model.gates[0].alpha[...] = jnp.zeros(6)
    out = L.extract(model)
    assert out.model.hidden == (1,) and out.macs is None
    x = jnp.ones((2, 8))
    np.testing.assert_allclose(out.model(x), model(x), atol=1e-6)


def test_extraction_errors():
    model = L.GatedMLP(8, (6,), 3, rngs=nnx.Rngs(0))
    model.gates[0].alpha[...] = jnp.array([1.0, -0.1, 1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="negative"):
        L.extract(model)
    good = {"gates/0/alpha": np.ones(6)}
    with pytest.raises(ValueError, match="do not match"):
        L.extract(model, gates={"gates/1/alpha": np.ones(6)})
    with pytest.raises(ValueError, match="shape"):
        L.extract(model, gates={"gates/0/alpha": np.ones(5)})
    with pytest.raises(ValueError, match="tau"):
        L.extract(model, gates=good, tau=1.0)
    with pytest.raises(ValueError, match="multiple must be an int >= 1, got 0"):
        L.extract(model, gates=good, multiple=0)
    with pytest.raises(ValueError, match=r"multiple\['gates/0/alpha'\] must be an int"):
        L.extract(model, gates=good, multiple={"gates/0/alpha": 1.5})
    with pytest.raises(ValueError, match=r"unknown gate groups \['blocks/0'\]"):
        L.extract(model, gates=good, multiple={"blocks/0": 8})
    for bad in (0, -5.0, float("nan"), True, "100"):
        with pytest.raises(ValueError, match="max_macs must be a positive finite number"):
            L.extract(model, gates=good, max_macs=bad, input_shape=(8,))
    with pytest.raises(ValueError, match="max_macs needs input_shape"):
        L.extract(model, gates=good, max_macs=100)
    with pytest.raises(ValueError, match="budget_loss must be a callable and needs max_macs"):
        L.extract(model, gates=good, budget_loss=lambda kept: 0.0)
    assert L.extract(model, gates=good).model.hidden == (6,)
    with pytest.raises(TypeError, match="extract supports"):
        L.extract(MLP(8, (6,), 3, rngs=nnx.Rngs(0)))


def test_measure_latency_and_uniform_widths():
    model = L.GatedCNN(1, 10, (4, 8), rngs=nnx.Rngs(0))
    family = L.uniform_width_models(model, (0.5, 1.0), rngs=nnx.Rngs(1))
    assert family[0.5].widths == (2, 4) and family[1.0].widths == (4, 8)
    assert family[0.5].strides == model.strides
    macs = [L.count_macs(family[m], (8, 8, 1)) for m in (0.5, 1.0)]
    assert macs[0] < macs[1] == L.cost_graph(model, (8, 8, 1)).dense()
    t = L.measure_latency(family[0.5], (8, 8, 1), repeats=3, warmup=1)
    assert 0 < t < 1.0

    # the other families: shapes only (nnx.eval_shape skips the initialisers)
    mlp = nnx.eval_shape(
        lambda: L.uniform_width_models(L.GatedMLP(6, (8,), 2, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0))
    )
    assert sorted(mlp) == [0.25, 0.5, 0.75, 1.0]
    assert [mlp[m].hidden for m in sorted(mlp)] == [(2,), (4,), (6,), (8,)]
    assert all(isinstance(m, MLP) for m in mlp.values())

    def slim_family():
        tfm = L.GatedTransformerClassifier(
            30, d_model=16, num_heads=4, mlp_dim=32, max_len=8, rngs=nnx.Rngs(0)
        )
        return L.uniform_width_models(tfm, (0.5,), rngs=nnx.Rngs(0))[0.5]

    slim = nnx.eval_shape(slim_family)
    assert slim.heads == (2, 2) and slim.mlp_dims == (16, 16) and slim.head_dim == 4
    assert slim.blocks[0].attn.q_proj.kernel.shape == (16, 8)
    lr = nnx.eval_shape(
        lambda: L.uniform_width_models(
            L.GatedMLP(10, (8,), 2, ranks=(4,), rngs=nnx.Rngs(0)), (0.5,), rngs=nnx.Rngs(0)
        )[0.5]
    )
    assert lr.hidden == (4,) and lr.ranks == (2,)
    with pytest.raises(ValueError, match="multiplier"):
        L.uniform_width_models(model, (0.0,), rngs=nnx.Rngs(0))


def test_train_with_surrogate_then_extract_and_finetune():
    """End to end on a tiny synthetic task: fit with the surrogate, extract, fine-tune."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 12)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
    model = L.GatedMLP(12, (16,), 2, rngs=nnx.Rngs(0))
    graph = L.cost_graph(model, (12,))
    tx = optax.chain(L.surrogate_penalty(graph, 2.0), optax.adam(5e-2), L.project_nonnegative())
    hist = fit(model, tx, (x, y), epochs=3, batch_size=32, progress=False)
    gates = L.gate_values(model)["gates/0/alpha"]
    assert float(jnp.min(gates)) == 0.0  # the projection produced exact zeros
    assert float(hist.opt_state[0].value) < 1.0
    out = L.extract(model, input_shape=(12,))
    assert out.macs < graph.dense()
    # exact once the sub-threshold gates are zeroed in the gated model too
    removed = np.setdiff1d(np.arange(16), out.kept["gates/0/alpha"])
    model.gates[0].alpha[...] = model.gates[0].alpha[...].at[removed].set(0.0)
    np.testing.assert_allclose(_fwd(out.model, x[:8]), _fwd(model, x[:8]), rtol=1e-5, atol=1e-5)
    hist = L.finetune(out.model, (x, y), epochs=1, batch_size=64, progress=False)
    assert hist.steps == 4 and np.isfinite(hist.final["train_loss"])
