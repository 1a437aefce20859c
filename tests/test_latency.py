"""Gates, cost models, the l1/l2 surrogate, lambda control (jaxcompress.latency)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxcompress.latency as L
from jaxcompress.masks import path_str
from jaxcompress.models import MLP, SmallCNN, TransformerClassifier
from jaxcompress.spdy import TimingTable


def _abstract(ctor):
    """The model's structure without running its initialisers (counting needs shapes only)."""
    return nnx.eval_shape(ctor)


def _gate_names(model):
    state = nnx.state(model, L.Gate)
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda v: isinstance(v, L.Gate))
    return {path_str(p) for p, _ in flat[0]}


# ---------------------------------------------------------------------------------------------
# Exact FLOPs (MAC) counting
# ---------------------------------------------------------------------------------------------


def test_layer_formulas_by_hand():
    assert L.conv_macs(3, 3, 4, 8, 5, 5) == 9 * 25 * 4 * 8
    assert L.conv_macs(3, 3, 4, 8, 5, 5, groups=4) == 9 * 25 * 1 * 8
    assert L.dense_macs(10, 7, tokens=3) == 210
    # QK^T and AV: 2 L^2 h d_h; projections: 4 L d h d_h
    assert L.attention_macs(6, 16, 2, 8, projections=False) == 2 * 36 * 16
    assert L.attention_macs(6, 16, 2, 8) == 2 * 36 * 16 + 4 * 6 * 16 * 16
    with pytest.raises(ValueError, match="groups"):
        L.conv_macs(3, 3, 4, 8, 5, 5, groups=3)
    with pytest.raises(ValueError, match="d_in"):
        L.dense_macs(-1, 3)


def test_count_macs_on_hand_computed_models():
    # SmallCNN on 8x8x3, widths (4, 6), strides (1, 1), pool after block 0:
    # 9*64*3*4 + 9*16*4*6 + 6*10
    cnn = _abstract(lambda: SmallCNN(3, 10, (4, 6), strides=(1, 1), rngs=nnx.Rngs(0)))
    hand = 9 * 64 * 3 * 4 + 9 * 16 * 4 * 6 + 6 * 10
    assert L.count_macs(cnn, (8, 8, 3)) == hand == L.cost_graph(cnn, (8, 8, 3)).dense()
    # stride 2 first block (SAME): 7x7 -> 4x4, pool -> 2x2
    cnn2 = _abstract(lambda: SmallCNN(3, 10, (4, 6), strides=(2, 1), rngs=nnx.Rngs(0)))
    hand2 = 9 * 16 * 3 * 4 + 9 * 4 * 4 * 6 + 6 * 10
    assert L.count_macs(cnn2, (7, 7, 3)) == hand2 == L.cost_graph(cnn2, (7, 7, 3)).dense()
    mlp = _abstract(lambda: MLP(12, (5,), 3, rngs=nnx.Rngs(0)))
    assert L.count_macs(mlp, (12,)) == 12 * 5 + 5 * 3 == L.cost_graph(mlp, (3, 4)).dense()
    # one encoder block, L=8, d=16, 2 heads of 8, mlp 32, 2 classes
    tfm = _abstract(
        lambda: TransformerClassifier(
            20, 2, d_model=16, num_heads=2, num_layers=1, mlp_dim=32, max_len=8, rngs=nnx.Rngs(0)
        )
    )
    hand_t = 3 * 8 * 16 * 16 + 2 * 64 * 16 + 8 * 16 * 16 + 2 * 8 * 16 * 32 + 16 * 2
    assert L.count_macs(tfm, (8,)) == hand_t == L.cost_graph(tfm, (8,)).dense()


def test_count_macs_functions_scan_and_cond():
    w = jnp.ones((4, 5))

    def body(c, _):
        return c @ jnp.ones((5, 5)), None

    def fn(x):
        y = x @ w  # 4*5 per example
        y, _ = jax.lax.scan(body, y, None, length=3)  # 3 * 25
        return jax.lax.cond(True, lambda v: v @ jnp.ones((5, 2)), lambda v: v[:, :2], y)

    assert L.count_macs(fn, (4,)) == 20 + 75 + 10
    conv = lambda x: jax.lax.conv_general_dilated(
        x, jnp.ones((3, 3, 2, 4)), (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    assert L.count_macs(conv, (6, 6, 2)) == 16 * 9 * 2 * 4
    with pytest.raises(ValueError, match="while_loop"):
        L.count_macs(lambda x: jax.lax.while_loop(lambda c: c[0, 0] < 3, lambda c: 2 * c, x), (2,))


def test_gated_graphs_match_the_counter_and_gate_names():
    cnn = _abstract(lambda: L.GatedCNN(rngs=nnx.Rngs(0)))
    g = L.cost_graph(cnn, (28, 28, 1))
    # default strides (2, 1, 1, 1): blocks at 14, 7, 4, 2 pixels
    hand = 9 * (196 * 32 + 49 * 32 * 64 + 16 * 64 * 64 + 4 * 64 * 128) + 128 * 10
    assert g.dense() == hand == L.count_macs(cnn, (28, 28, 1))
    assert set(g.group_sizes) == _gate_names(cnn)
    lowrank = _abstract(lambda: L.GatedMLP(20, (8, 6), 3, ranks=(4, 3), rngs=nnx.Rngs(0)))
    g = L.cost_graph(lowrank, (20,))
    assert g.dense() == (20 + 8) * 4 + (8 + 6) * 3 + 6 * 3 == L.count_macs(lowrank, (20,))
    assert set(g.group_sizes) == _gate_names(lowrank)
    tfm = _abstract(
        lambda: L.GatedTransformerClassifier(
            20, d_model=16, num_heads=4, num_layers=1, mlp_dim=8, max_len=6, rngs=nnx.Rngs(0)
        )
    )
    g = L.cost_graph(tfm, (6,))
    assert g.dense() == L.count_macs(tfm, (6,))
    assert set(g.group_sizes) == _gate_names(tfm)
    with pytest.raises(ValueError, match="channels"):
        L.cost_graph(cnn, (28, 28, 3))
    with pytest.raises(ValueError, match="max_len"):
        L.cost_graph(tfm, (7,))
    with pytest.raises(TypeError, match="no cost graph"):
        L.cost_graph(_abstract(lambda: nnx.Linear(2, 2, rngs=nnx.Rngs(0))), (2,))


def test_layer_graph_validation():
    with pytest.raises(ValueError, match="unknown groups"):
        L.LayerGraph((L.CostTerm("a", 1, (("g",), (3,))),))
    with pytest.raises(ValueError, match="duplicate term"):
        t = L.CostTerm("a", 1, ((2,), (3,)))
        L.LayerGraph((t, t))
    with pytest.raises(ValueError, match="coef"):
        L.CostTerm("a", -1, ((2,),))


# ---------------------------------------------------------------------------------------------
# The surrogate
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_ratio_is_scale_invariant(p):
    a = jax.random.uniform(jax.random.key(0), (37,))
    for c in (1e-2, 0.5, 7.0, 1e3):
        np.testing.assert_allclose(L.ratio(c * a, p), L.ratio(a, p), rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 10, 64])
def test_ratio_equals_count_when_nonzeros_are_equal(k):
    a = jnp.zeros(64).at[jnp.arange(0, 64, 64 // k)[:k]].set(0.37)
    np.testing.assert_allclose(L.ratio(a), k, rtol=1e-5)
    np.testing.assert_allclose(L.ratio(a, 1.0), math.sqrt(k), rtol=1e-5)
    # unequal non-zeros: strictly below the count for p = 2
    b = a.at[0].set(3.0)
    assert float(L.ratio(b)) < k or k == 1


def test_gate_diagnostics_uniformity_and_the_vanishing_push():
    rng = np.random.default_rng(0)
    unequal = rng.uniform(0.01, 1.0, 50)
    gates = {
        "equal": np.full(16, 0.3),
        "unequal": unequal,
        "pruned": np.concatenate([np.zeros(6), np.full(4, 2.0), [1e-4]]),  # 1e-4 < tau * 2
        "dead": np.zeros(5),
    }
    stats = L.gate_diagnostics(gates, tau=1e-2)
    assert stats["equal"] == {
        "size": 16,
        "kept": 16,
        "max": 0.3,
        "rms_kept": pytest.approx(0.3),
        "uniformity": 1.0,
    }
    # oracle: mean^2 / mean-square of the kept gates
    kept = unequal[unequal >= 1e-2 * unequal.max()]
    assert stats["unequal"]["kept"] == kept.size
    assert stats["unequal"]["uniformity"] == pytest.approx(kept.mean() ** 2 / np.mean(kept**2))
    assert stats["unequal"]["uniformity"] < 1.0
    assert stats["pruned"]["kept"] == 4 and stats["pruned"]["uniformity"] == pytest.approx(1.0)
    assert stats["dead"]["kept"] == 0 and stats["dead"]["uniformity"] == 0.0
    # uniformity = r(kept) / kept for p = 2, and the ratio's gradient vanishes at u = 1
    assert stats["unequal"]["uniformity"] == pytest.approx(
        float(L.ratio(jnp.asarray(kept))) / kept.size, rel=1e-5
    )
    g_equal = jax.grad(L.ratio)(jnp.asarray(gates["equal"]))
    g_unequal = jax.grad(L.ratio)(jnp.asarray(unequal))
    assert float(jnp.max(jnp.abs(g_equal))) < 1e-4 * float(jnp.max(jnp.abs(g_unequal)))


def test_gate_diagnostics_bad_input():
    with pytest.raises(TypeError, match="gates must be a mapping"):
        L.gate_diagnostics([np.ones(3)])
    with pytest.raises(ValueError, match="'g' has negative or non-finite"):
        L.gate_diagnostics({"g": np.array([0.5, -0.1])})
    with pytest.raises(ValueError, match="non-finite"):
        L.gate_diagnostics({"g": np.array([0.5, np.nan])})
    with pytest.raises(ValueError, match="1-D"):
        L.gate_diagnostics({"g": np.ones((2, 2))})
    with pytest.raises(ValueError, match="tau"):
        L.gate_diagnostics({"g": np.ones(3)}, tau=1.0)


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e-12, 1e-6])
def test_gradients_finite_at_and_near_zero(p, scale):
    a = scale * jnp.arange(1.0, 9.0)
    g = jax.grad(lambda a: L.ratio(a, p))(a)
    assert np.all(np.isfinite(g))
    graph = L.LayerGraph((L.CostTerm("l", 2.0, (("x",), ("y",))),), (("x", 8), ("y", 8)))
    g2 = jax.grad(lambda z: L.flops_regularizer({"x": z, "y": z + 1.0}, graph, p=p))(a)
    assert np.all(np.isfinite(g2))
    assert float(L.ratio(jnp.zeros(4), p)) == 0.0


def test_flops_regularizer_is_exact_for_equal_gates():
    model = _abstract(lambda: L.GatedCNN(1, 10, (8, 8, 8, 16), rngs=nnx.Rngs(0)))
    graph = L.cost_graph(model, (16, 16, 1))
    gates = {k: jnp.ones(n) for k, n in graph.group_sizes.items()}
    np.testing.assert_allclose(L.flops_regularizer(gates, graph), 1.0, rtol=1e-6)
    gates["blocks/1/gate/alpha"] = jnp.zeros(8).at[:3].set(2.5)
    gates["blocks/3/gate/alpha"] = jnp.zeros(16).at[5:9].set(0.1)
    counts = {k: int(jnp.sum(v > 0)) for k, v in gates.items()}
    expected = graph.macs(counts) / graph.dense()
    np.testing.assert_allclose(L.flops_regularizer(gates, graph), expected, rtol=1e-5)
    active = L.active_counts(gates, graph)
    assert {k: int(v) for k, v in active.items()} == counts
    # scale invariance of the whole regulariser
    scaled = {k: 10.0 * v for k, v in gates.items()}
    np.testing.assert_allclose(
        L.flops_regularizer(scaled, graph), L.flops_regularizer(gates, graph), rtol=1e-6
    )
    # l1 baseline shrinks with scale
    assert float(L.l1_penalty(scaled, graph)) == pytest.approx(10 * float(L.l1_penalty(gates)))


def test_surrogate_errors():
    graph = L.LayerGraph((L.CostTerm("l", 1.0, (("x",), (3,))),), (("x", 4),))
    with pytest.raises(ValueError, match="p must be"):
        L.ratio(jnp.ones(3), 0.0)
    with pytest.raises(ValueError, match="p must be"):
        L.ratio(jnp.ones(3), -2.0)
    with pytest.raises(ValueError, match="missing groups"):
        L.flops_regularizer({"y": jnp.ones(4)}, graph)
    with pytest.raises(ValueError, match="shape"):
        L.flops_regularizer({"x": jnp.ones(5)}, graph)
    with pytest.raises(ValueError, match="target"):
        L.lambda_controller(13.0, graph)  # dense is 12
    with pytest.raises(ValueError, match="target"):
        L.lambda_controller(0.0, graph)
    with pytest.raises(ValueError, match="mode"):
        L.lambda_controller(6.0, graph, mode="bang-bang")
    with pytest.raises(ValueError, match="feedback"):
        L.surrogate_penalty(graph, 1.0, feedback="oracle")
    with pytest.raises(ValueError, match="strength"):
        L.surrogate_penalty(graph, -1.0)
    with pytest.raises(ValueError, match="ramp_steps"):
        L.linear_ramp(1.0, 0)
    with pytest.raises(ValueError, match="init"):
        L.ChannelGate(3, init=0.0, parametrization="softplus")
    with pytest.raises(ValueError, match="parametrization"):
        L.ChannelGate(3, parametrization="relu")
    tx = L.surrogate_penalty(graph, 1.0)
    with pytest.raises(ValueError, match="gate groups"):
        tx.update({"z": jnp.ones(4)}, tx.init({"z": jnp.ones(4)}), {"z": jnp.ones(4)})


def test_linear_ramp():
    sched = L.linear_ramp(0.5, 10, delay=5)
    assert [float(sched(t)) for t in (0, 5, 10, 15, 100)] == [0.0, 0.0, 0.25, 0.5, 0.5]


# ---------------------------------------------------------------------------------------------
# Positivity and the optax transforms
# ---------------------------------------------------------------------------------------------


def test_projection_keeps_gates_nonnegative_through_optax():
    model = L.GatedMLP(6, (5, 4), 2, rngs=nnx.Rngs(0))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    tx = optax.chain(optax.sgd(0.5), L.project_nonnegative())
    state = tx.init(params)
    # a gradient pushing every parameter up => sgd steps them down by 0.5 per step
    grads = jax.tree.map(lambda v: jnp.ones_like(v), params)
    step = jax.jit(lambda p, s: optax.apply_updates(p, tx.update(grads, s, p)[0]))
    for _ in range(3):
        params = step(params, state)
    gates = L.gate_values(params)
    assert all(float(jnp.min(g)) == 0.0 for g in gates.values())  # clipped exactly at 0
    assert float(params["layers"][0]["kernel"][...].max()) < 0  # other params are free
    # plain pytrees: select by path
    tx2 = L.project_nonnegative(where=lambda path, leaf: path.startswith("g"))
    p2 = {"g": jnp.array([0.1, 2.0]), "w": jnp.array([0.1, 2.0])}
    u, _ = tx2.update({"g": -jnp.ones(2), "w": -jnp.ones(2)}, tx2.init(p2), p2)
    new = optax.apply_updates(p2, u)
    np.testing.assert_array_equal(new["g"], [0.0, 1.0])
    np.testing.assert_allclose(new["w"], [-0.9, 1.0])
    with pytest.raises(ValueError, match="params"):
        tx2.update(u, tx2.init(p2))


def test_projection_prunes_gates_below_a_relative_threshold():
    tx = L.project_nonnegative(where=lambda path, leaf: path == "g", prune_below=0.1)
    p = {"g": jnp.array([1.0, 0.3, 0.25, 0.5]), "w": jnp.array([0.01, 1.0])}
    # after the step: [2.0, 0.3, 0.15, -0.5] -> max 2.0, threshold 0.2: 0.15 and -0.5 go to 0
    u, _ = tx.update({"g": jnp.array([1.0, 0.0, -0.1, -1.0]), "w": jnp.zeros(2)}, tx.init(p), p)
    new = optax.apply_updates(p, u)
    np.testing.assert_array_equal(new["g"], np.float32([2.0, 0.3, 0.0, 0.0]))  # exact zeros
    np.testing.assert_array_equal(new["w"], p["w"])  # unselected leaves untouched
    for bad in (-0.1, 1.0, True, "0.1"):
        with pytest.raises(ValueError, match="prune_below must be a float in"):
            L.project_nonnegative(prune_below=bad)


def test_softplus_gates_are_positive_and_untouched_by_projection():
    gate = L.ChannelGate(4, init=0.5, parametrization="softplus")
    np.testing.assert_allclose(gate.values(), 0.5, rtol=1e-6)
    gate.alpha[...] = jnp.array([-50.0, -1.0, 0.0, 3.0])
    assert float(jnp.min(gate.values())) > 0
    vals = L.gate_values(nnx.state(gate, L.Gate))
    np.testing.assert_allclose(vals["alpha"], jax.nn.softplus(gate.alpha[...]))
    state = nnx.state(gate, L.Gate)
    tx = L.project_nonnegative()
    u, _ = tx.update(jax.tree.map(lambda v: -10 * jnp.ones_like(v), state), tx.init(state), state)
    np.testing.assert_allclose(u["alpha"][...], -10.0)


def test_surrogate_penalty_adds_lambda_grad_of_r():
    model = L.GatedMLP(6, (5, 4), 2, parametrization="softplus", rngs=nnx.Rngs(0))
    model.gates[0].alpha[...] = jnp.array([0.3, -1.0, 2.0, 0.0, 1.0])
    graph = L.cost_graph(model, (6,))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = L.surrogate_penalty(graph, 0.7)
    updates, state = jax.jit(tx.update)(zeros, tx.init(params), params)

    def reg(raw0):
        gates = L.gate_values(model)
        gates["gates/0/alpha"] = jax.nn.softplus(raw0)
        return 0.7 * L.flops_regularizer(gates, graph)

    expected = jax.grad(reg)(model.gates[0].alpha[...])
    np.testing.assert_allclose(updates["gates"][0]["alpha"][...], expected, rtol=1e-5, atol=1e-8)
    assert float(jnp.abs(updates["layers"][0]["kernel"][...]).max()) == 0.0
    np.testing.assert_allclose(state.value, L.flops_regularizer(L.gate_values(model), graph))


def test_surrogate_penalty_rms_scale_is_scale_free():
    """``scale="rms"``: each group's added gradient is lambda * dR/da * rms(a), so scaling one
    group's gates by c leaves it unchanged (the plain gradient scales by 1/c)."""
    model = L.GatedMLP(6, (5, 4), 2, rngs=nnx.Rngs(0))
    model.gates[0].alpha[...] = jnp.array([0.3, 0.1, 2.0, 0.0, 1.0])
    model.gates[1].alpha[...] = jnp.array([0.5, 0.2, 0.7, 0.4])
    graph = L.cost_graph(model, (6,))

    def added(scale, c):
        m = nnx.clone(model)
        m.gates[1].alpha[...] = c * m.gates[1].alpha[...]
        _, params, _ = nnx.split(m, nnx.Param, ...)
        zeros = jax.tree.map(jnp.zeros_like, params)
        tx = L.surrogate_penalty(graph, 0.7, scale=scale)
        updates, _ = tx.update(zeros, tx.init(params), params)
        return [np.asarray(updates["gates"][i]["alpha"][...]) for i in range(2)]

    plain, rms = added("none", 1.0), added("rms", 1.0)
    for g_plain, g_rms, gate in zip(plain, rms, model.gates, strict=True):
        a = np.asarray(gate.alpha[...])
        np.testing.assert_allclose(g_rms, g_plain * np.sqrt(np.mean(a**2)), rtol=1e-5)
    plain10, rms10 = added("none", 10.0), added("rms", 10.0)
    np.testing.assert_allclose(plain10[1], plain[1] / 10.0, rtol=1e-4)
    np.testing.assert_allclose(rms10[1], rms[1], rtol=1e-4)
    with pytest.raises(ValueError, match="scale must be 'none' or 'rms'"):
        L.surrogate_penalty(graph, 1.0, scale="l2")


def _toy(feedback, multiple=1):
    sizes = {"a": 16, "b": 32, "c": 16}
    graph = L.LayerGraph(
        (
            L.CostTerm("l1", 10, ((3,), ("a",))),
            L.CostTerm("l2", 5, (("a",), ("b",))),
            L.CostTerm("l3", 5, (("b",), ("c",))),
            L.CostTerm("head", 1, (("c",), (4,))),
        ),
        tuple(sizes.items()),
    )
    keys = jax.random.split(jax.random.key(0), 6)
    importance = {
        n: jax.random.uniform(k, (s,), minval=0.1, maxval=1.0)
        for (n, s), k in zip(sizes.items(), keys[:3], strict=True)
    }
    ctrl = L.lambda_controller(0.4 * graph.dense(), graph, lam0=0.01, gain=0.05)
    tx = optax.chain(
        L.surrogate_penalty(graph, ctrl, feedback=feedback, multiple=multiple),
        optax.sgd(0.05),
        L.project_nonnegative(where=lambda path, leaf: True),
    )

    def task(p):  # every gate wants to be 1, some more than others
        return sum(jnp.sum(importance[n] * (p[n] - 1.0) ** 2) for n in p)

    def step(carry, _):
        p, s = carry
        u, s = tx.update(jax.grad(task)(p), s, p)
        return (optax.apply_updates(p, u), s), None

    # Unequal start: at equal gates (all ones) R is at its maximum, its gradient is 0 up to
    # float32 round-off, and the task's gradient is 0 too; nothing would break the symmetry.
    params = {
        n: jax.random.uniform(k, (s,), minval=0.95, maxval=1.0)
        for (n, s), k in zip(sizes.items(), keys[3:], strict=True)
    }
    (params, state), _ = jax.jit(lambda c: jax.lax.scan(step, c, None, length=800))(
        (params, tx.init(params))
    )
    return graph, params, state[0]


def test_controller_reaches_the_surrogate_target():
    graph, params, state = _toy("surrogate")
    assert abs(float(state.value) - 0.4) < 0.01
    assert abs(float(L.flops_regularizer(params, graph)) - 0.4) < 0.01
    assert all(float(jnp.min(v)) >= 0 for v in params.values())


def test_controller_with_active_feedback_reaches_the_real_flops_target():
    graph, params, state = _toy("active")
    real = graph.macs(L.active_counts(params, graph)) / graph.dense()
    assert abs(float(real) - 0.4) < 0.03
    np.testing.assert_allclose(state.value, real, rtol=1e-6)


def test_active_feedback_steers_the_cost_of_counts_rounded_to_a_multiple():
    graph, params, state = _toy("active", multiple=2)
    counts = L.active_counts(params, graph, multiple=2)
    assert all(int(v) % 2 == 0 for v in counts.values())
    real = graph.macs(counts) / graph.dense()
    assert abs(float(real) - 0.4) < 0.04  # one step of 2 units of "b" is 0.056
    np.testing.assert_allclose(state.value, real, rtol=1e-6)
    odd = {"a": jnp.ones(16), "b": jnp.zeros(32).at[:5].set(1.0), "c": jnp.ones(16).at[3].set(0)}
    assert {k: int(v) for k, v in L.active_counts(odd, graph, multiple=2).items()} == {
        "a": 16, "b": 6, "c": 16,  # 5 -> 6; 15 -> 16
    }  # fmt: skip
    counts8 = jax.jit(lambda g: L.active_counts(g, graph, multiple={"b": 8}))(odd)
    assert {k: int(v) for k, v in counts8.items()} == {"a": 16, "b": 8, "c": 15}
    with pytest.raises(ValueError, match="multiple must be an int >= 1"):
        L.surrogate_penalty(graph, 1.0, multiple=0)
    with pytest.raises(ValueError, match="unknown gate groups"):
        L.active_counts(params, graph, multiple={"z": 2})


def test_pi_controller_update():
    ctrl = L.lambda_controller(50.0, 100.0, lam0=1.0, gain=2.0, mode="pi", ki=0.5, lam_max=10.0)
    s = ctrl.init()
    s = ctrl.update(s, 0.75)  # error (0.75 - 0.5) / 0.5 = 0.5
    np.testing.assert_allclose(s.lam, 1.0 + 2.0 * 0.5 + 0.5 * 0.5)
    s = ctrl.update(s, 0.25)  # error -0.5, integral 0
    np.testing.assert_allclose(s.lam, 1.0 - 1.0)


def test_surrogate_step_does_not_recompile():
    traces = []
    graph = L.LayerGraph((L.CostTerm("l", 1.0, (("x",), (3,))),), (("x", 4),))
    tx = optax.chain(L.surrogate_penalty(graph, L.linear_ramp(1.0, 5)), L.project_nonnegative())

    @jax.jit
    def step(p, s):
        traces.append(1)
        u, s = tx.update(jax.tree.map(jnp.zeros_like, p), s, p)
        return optax.apply_updates(p, u), s

    p = {"x": jnp.array([1.0, 0.5, 0.2, 0.1])}
    s = tx.init(p)
    for _ in range(3):
        p, s = step(p, s)
    assert len(traces) == 1


# ---------------------------------------------------------------------------------------------
# Latency model
# ---------------------------------------------------------------------------------------------


def _synthetic_latency_model():
    graph = L.LayerGraph(
        (
            L.CostTerm("a", 1.0, ((4,), ("x",)), L.OpSpec("dense", (1,), (1, 1))),
            L.CostTerm("b", 1.0, (("x",), ("y",)), L.OpSpec("dense", (1,), (1, 1))),
            L.CostTerm("c", 1.0, ((4,), (2,)), L.OpSpec("dense", (1,), (1, 1))),
        ),
        (("x", 8), ("y", 4)),
    )
    xs, ys = np.array([2.0, 4.0, 8.0]), np.array([2.0, 4.0])
    grids = {
        "a": (("x",), (xs,), 0.1 * xs),
        "b": (("x", "y"), (xs, ys), 0.01 * xs[:, None] * ys[None, :] + 0.05),
        "c": ((), (), np.array(0.2)),
    }
    return graph, L.LatencyModel(graph, grids, overhead=0.5)


def test_latency_model_interpolates_and_round_trips_through_a_timing_table():
    graph, model = _synthetic_latency_model()
    dense = 0.5 + 0.8 + (0.32 + 0.05) + 0.2
    assert model.dense() == pytest.approx(dense, rel=1e-6)
    # bilinear inside the grid: x = 6 (between 4 and 8), y = 3 (between 2 and 4)
    got = model.latency({"x": 6.0, "y": 3.0})
    assert float(got) == pytest.approx(0.5 + 0.6 + (0.01 * 18 + 0.05) + 0.2, rel=1e-5)
    table = model.to_table()
    assert isinstance(table, TimingTable) and table["b"].labels[0] == "x=8,y=4"
    back = L.LatencyModel.from_table(graph, TimingTable.from_json(table.to_json()))
    assert float(back.latency({"x": 5.0, "y": 2.5})) == pytest.approx(
        float(model.latency({"x": 5.0, "y": 2.5})), rel=1e-6
    )
    gates = {"x": jnp.ones(8).at[:3].set(0.0), "y": jnp.ones(4)}
    reg = L.latency_regularizer(gates, model)
    assert float(reg) == pytest.approx(float(model.latency({"x": 5.0, "y": 4.0})) / dense, 1e-5)
    assert np.all(np.isfinite(jax.grad(lambda g: L.latency_regularizer(g, model))(gates)["x"]))


def test_monotone_latency_model_is_the_envelope_over_wider_widths():
    graph, model = _synthetic_latency_model()
    rng = np.random.default_rng(0)
    groups, axes, _ = model.grids["b"]
    noisy = rng.uniform(0.1, 1.0, (3, 2))  # not monotone
    bumpy = L.LatencyModel(
        graph, {**model.grids, "b": (groups, axes, noisy)}, overhead=model.overhead
    )
    env = bumpy.monotone().grids["b"][2]
    for i in range(3):
        for j in range(2):  # brute force: the fastest grid point at least as wide in both
            assert env[i, j] == noisy[i:, j:].min()
    assert np.all(np.diff(env, axis=0) >= 0) and np.all(np.diff(env, axis=1) >= 0)
    np.testing.assert_array_equal(bumpy.grids["b"][2], noisy)  # the original is unchanged
    # already monotone grids, and the full-width point, are kept
    np.testing.assert_array_equal(bumpy.monotone().grids["a"][2], model.grids["a"][2])
    assert bumpy.monotone().dense() == pytest.approx(bumpy.dense())


def _bumpy_latency_model(seed=0):
    """The synthetic model with non-monotone grids: some wider widths run faster."""
    graph, model = _synthetic_latency_model()
    rng = np.random.default_rng(seed)
    grids = dict(model.grids)
    for name in ("a", "b"):
        groups, axes, times = grids[name]
        grids[name] = (groups, axes, rng.uniform(0.1, 1.0, times.shape))
    return graph, L.LatencyModel(graph, grids, overhead=model.overhead)


def _fastest_by_brute_force(model, counts):
    """Oracle: every candidate combination, fastest first, then the narrowest."""
    sizes = model.graph.group_sizes
    cands = {}
    for g, c in counts.items():
        widths = set()
        for groups, axes, _ in model.grids.values():
            for h, axis in zip(groups, axes, strict=True):
                widths |= {int(w) for w in axis} if h == g else set()
        cands[g] = [c] + sorted(w for w in widths if c < w <= sizes[g])
    names = list(counts)
    scored = []
    for combo in itertools.product(*(cands[g] for g in names)):
        widths = dict(zip(names, combo, strict=True))
        time = float(model.latency({g: float(w) for g, w in widths.items()}))
        scored.append((time, sum(combo), widths))
    return min(scored, key=lambda t: t[:2])


@pytest.mark.parametrize("seed", range(4))
def test_fastest_widths_is_the_fastest_combination_at_least_as_wide(seed):
    _, model = _bumpy_latency_model(seed)
    for counts in ({"x": 2, "y": 2}, {"x": 3, "y": 2}, {"x": 5, "y": 3}, {"x": 8, "y": 4}):
        got = model.fastest_widths(counts, min_gain=0.0)
        time, _, want = _fastest_by_brute_force(model, counts)
        assert got == want
        assert all(got[g] >= counts[g] for g in counts)
        assert float(model.latency(got)) == pytest.approx(time, rel=1e-6)
        assert float(model.latency(got)) <= float(model.latency(counts)) * (1 + 1e-6)
        # coordinate descent (forced by a tiny search limit) never does worse than the start
        cd = model.fastest_widths(counts, min_gain=0.0, max_combinations=1)
        assert all(cd[g] >= counts[g] for g in counts)
        assert float(model.latency(cd)) <= float(model.latency(counts)) * (1 + 1e-6)


def test_fastest_widths_keeps_a_monotone_model_and_respects_min_gain():
    _, model = _synthetic_latency_model()  # times grow with width: nothing to gain
    assert model.fastest_widths({"x": 3, "y": 2}) == {"x": 3, "y": 2}
    graph, _ = _synthetic_latency_model()
    xs, ys = np.array([2.0, 4.0, 8.0]), np.array([2.0, 4.0])
    a = np.array([0.5, 0.4, 0.9])  # x=4 is 0.1 faster than x=2
    grids = {
        "a": (("x",), (xs,), a),
        "b": (("x", "y"), (xs, ys), np.full((3, 2), 0.1)),
        "c": ((), (), np.array(0.2)),
    }
    model = L.LatencyModel(graph, grids, overhead=0.0)
    assert model.fastest_widths({"x": 2, "y": 2}) == {"x": 4, "y": 2}
    assert L.PAD_MIN_GAIN == 0.0  # chosen by experiments/benchmarks/latency_padding.py
    # the gain is 0.1 of 0.8 (12.5%): a 20% threshold keeps the narrower widths
    assert model.fastest_widths({"x": 2, "y": 2}, min_gain=0.2) == {"x": 2, "y": 2}
    assert model.fastest_widths({"x": 2, "y": 2}, min_gain=0.1) == {"x": 4, "y": 2}
    for bad, match in (
        ({"x": 2}, "counts must map every group"),
        ({"x": 0, "y": 2}, r"counts\['x'\] must be an int in \[1, 8\]"),
        ({"x": 9, "y": 2}, r"counts\['x'\] must be an int in \[1, 8\]"),
        ({"x": 2.5, "y": 2}, r"counts\['x'\]"),
    ):
        with pytest.raises(ValueError, match=match):
            model.fastest_widths(bad)
    for bad in (-0.1, 1.0, float("nan"), True):
        with pytest.raises(ValueError, match="min_gain must be a float in"):
            model.fastest_widths({"x": 2, "y": 2}, min_gain=bad)
    with pytest.raises(ValueError, match="max_combinations"):
        model.fastest_widths({"x": 2, "y": 2}, max_combinations=0)


def test_latency_form_runs_under_jit():
    # dense() is read inside the traced regulariser: it must stay a concrete float there.
    graph, model = _synthetic_latency_model()
    gates = {"x": jnp.ones(8).at[:3].set(0.0), "y": jnp.ones(4)}
    eager = float(L.latency_regularizer(gates, model))
    assert float(jax.jit(L.latency_regularizer, static_argnums=1)(gates, model)) == pytest.approx(
        eager, rel=1e-6
    )
    ctrl = L.lambda_controller(0.5 * model.dense(), model, lam0=0.1, gain=0.5)
    tx = L.surrogate_penalty(model, ctrl, feedback="active")
    state = tx.init(gates)
    zeros = jax.tree.map(jnp.zeros_like, gates)
    updates, state = jax.jit(tx.update)(zeros, state, gates)
    dense = model.dense()
    assert float(state.value) == pytest.approx(float(model.latency({"x": 5, "y": 4})) / dense)
    # the push is the gradient of the regulariser, lambda times
    grad = jax.grad(lambda g: L.latency_regularizer(g, model))(gates)
    np.testing.assert_allclose(updates["x"], 0.1 * grad["x"], rtol=1e-5)


def test_measure_latency_model_on_this_device():
    # Entries are layer time minus the per-call overhead of a trivial call, clipped at 0: a
    # 16x8 layer at batch 1 is all overhead and measured 0 under load. Time a layer whose
    # work stands out of the overhead.
    model = _abstract(lambda: L.GatedMLP(1024, (512,), 4, rngs=nnx.Rngs(0)))
    graph = L.cost_graph(model, (1024,))
    lat = L.measure_latency_model(graph, multipliers=(0.5, 1.0), batch=256, repeats=5, warmup=1)
    _, axes, times = lat.grids["layers/0"]
    np.testing.assert_array_equal(axes[0], [256.0, 512.0])
    assert times.shape == (2,) and np.all(times > 0)
    assert lat.dense() > 0
    # the SPDY timing options pass through: CPU clock of single-threaded executables
    cpu = L.measure_latency_model(
        graph,
        multipliers=(1.0,),
        batch=256,
        repeats=5,
        warmup=1,
        clock="cpu",
        compiler_options={"xla_cpu_multi_thread_eigen": False},
    )
    assert cpu.grids["layers/0"][2].shape == (1,) and cpu.dense() >= 0
    with pytest.raises(ValueError, match="multipliers"):
        L.measure_latency_model(graph, multipliers=(0.0,))
    with pytest.raises(ValueError, match="clock"):
        L.measure_latency_model(graph, multipliers=(1.0,), clock="gpu")
