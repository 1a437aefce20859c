"""The l1/l2 surrogate, its optax transforms, lambda control and the latency model
(jaxcompress.latency), against hand-written oracles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxcompress as jc
import jaxcompress.latency as L
from jaxcompress import structure as S
from jaxcompress.spdy import TimingTable

_KEY = jax.random.key(0)
_EPS = 1e-6


def _r(a, p=2.0):
    """Oracle of the ratio, in float64 NumPy."""
    a = np.asarray(a, np.float64)
    return (np.abs(a).sum() / np.sqrt((a**2).sum() + _EPS**2)) ** p


# ---------------------------------------------------------------------------------------------
# The ratio
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1.0, 2.0, 0.5])
def test_ratio_matches_the_oracle_and_is_scale_invariant(p):
    a = jax.random.uniform(_KEY, (12,), minval=0.1, maxval=2.0)
    np.testing.assert_allclose(L.ratio(a, p), _r(a, p), rtol=1e-5)
    np.testing.assert_allclose(L.ratio(7.0 * a, p), L.ratio(a, p), rtol=1e-5)
    assert float(L.ratio(jnp.zeros(4), p)) == 0.0
    g = jax.grad(lambda x: L.ratio(x, p))(jnp.zeros(4))
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("k", [1, 3, 8])
def test_ratio_is_the_count_of_equal_nonzeros(k):
    a = jnp.zeros(8).at[:k].set(0.3)
    np.testing.assert_allclose(L.ratio(a), k, rtol=1e-5)


def test_ratio_gradient_is_the_closed_form():
    # d r / d a_j = (2 s1 / s2^2) (1 - s1 a_j / s2^2) for p = 2, a >= 0
    a = np.asarray(jax.random.uniform(_KEY, (9,), minval=0.0, maxval=1.0), np.float64)
    s1, s2sq = a.sum(), (a**2).sum() + _EPS**2
    want = 2 * s1 / s2sq * (1 - s1 * a / s2sq)
    got = jax.grad(L.ratio)(jnp.asarray(a, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_gate_diagnostics():
    d = L.gate_diagnostics({"a": np.array([1.0, 1.0, 0.0, 0.001]), "z": np.zeros(3)}, tau=0.01)
    assert d["a"]["kept"] == 2 and d["a"]["uniformity"] == pytest.approx(1.0)
    assert d["z"] == {"size": 3, "kept": 0, "max": 0.0, "rms_kept": 0.0, "uniformity": 0.0}
    with pytest.raises(ValueError, match="negative"):
        L.gate_diagnostics({"a": np.array([1.0, -1.0])})
    with pytest.raises(ValueError, match="tau"):
        L.gate_diagnostics({"a": np.ones(2)}, tau=1.0)


# ---------------------------------------------------------------------------------------------
# FLOPs regulariser on a real model's MAC polynomial
# ---------------------------------------------------------------------------------------------


def _mlp():
    model = jc.models.MLP(hidden=(32, 16), rngs=nnx.Rngs(0))
    return model, jax.random.normal(_KEY, (2, 28, 28, 1))


def _mlp_macs_by_hand(h0, h1):
    return 784 * h0 + h0 * h1 + h1 * 10


def _mlp_R(a0, a1):
    return _mlp_macs_by_hand(_r(a0), _r(a1)) / _mlp_macs_by_hand(32, 16)


def test_regularizer_and_its_gradient_match_the_hand_polynomial():
    model, x = _mlp()
    macs = S.macs(model, x[:1])
    rng = np.random.default_rng(0)
    a0, a1 = rng.uniform(0, 1, 32), rng.uniform(0, 1, 16) * (rng.uniform(size=16) > 0.3)
    gates = {"layers/0": jnp.asarray(a0, jnp.float32), "layers/1": jnp.asarray(a1, jnp.float32)}
    np.testing.assert_allclose(L.regularizer(gates, macs), _mlp_R(a0, a1), rtol=1e-5)
    grad = jax.jit(jax.grad(lambda g: L.regularizer(g, macs)))(gates)
    h = 1e-6
    for name, a in (("layers/0", a0), ("layers/1", a1)):
        num = np.zeros_like(a)
        for j in range(a.size):
            up, down = a.copy(), a.copy()
            up[j] += h
            down[j] -= h if a[j] > 0 else 0.0  # gates >= 0: the right derivative at 0
            args_up = (up, a1) if name == "layers/0" else (a0, up)
            args_down = (down, a1) if name == "layers/0" else (a0, down)
            num[j] = (_mlp_R(*args_up) - _mlp_R(*args_down)) / (up[j] - down[j])
        np.testing.assert_allclose(grad[name], num, rtol=2e-3, atol=1e-6)
    # equal all-on gates: the dense model
    ones = {"layers/0": jnp.ones(32), "layers/1": jnp.ones(16)}
    np.testing.assert_allclose(L.regularizer(ones, macs), 1.0, rtol=1e-5)
    # a group of the cost without gates counts at full size
    only0 = {"layers/0": gates["layers/0"]}
    want = _mlp_macs_by_hand(_r(a0), 16) / _mlp_macs_by_hand(32, 16)
    np.testing.assert_allclose(L.regularizer(only0, macs), want, rtol=1e-5)


def test_l1_penalty_and_surrogate_counts():
    gates = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([0.5, 0.5, 0.0])}
    np.testing.assert_allclose(L.l1_penalty(gates), 4.0)
    counts = L.surrogate_counts(gates)
    np.testing.assert_allclose(counts["b"], 2.0, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# surrogate_penalty on the params of a Gated model
# ---------------------------------------------------------------------------------------------


def _penalty_updates(tx, g):
    params = nnx.state(g, nnx.Param)
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = tx.init(params)
    updates, state = tx.update(zeros, state, params)
    return params, updates, state


def test_surrogate_penalty_adds_lambda_times_the_oracle_gradient():
    model, x = _mlp()
    g = L.gated(model, x)
    assert set(g.gates) == {"layers/0", "layers/1"}
    rng = np.random.default_rng(1)
    a0, a1 = rng.uniform(0.1, 1, 32), rng.uniform(0.1, 1, 16)
    g.gates["layers/0"][...] = jnp.asarray(a0, jnp.float32)
    g.gates["layers/1"][...] = jnp.asarray(a1, jnp.float32)
    macs = S.macs(model, x[:1])
    lam = 0.7
    params, updates, state = _penalty_updates(L.surrogate_penalty(macs, lam), g)
    want0 = jax.grad(lambda a: L.regularizer({"layers/0": a, "layers/1": a1}, macs))(
        jnp.asarray(a0, jnp.float32)
    )
    np.testing.assert_allclose(updates["gates"]["layers/0"][...], lam * want0, rtol=1e-5)
    np.testing.assert_allclose(state.value, _mlp_R(a0, a1), rtol=1e-5)
    # every non-gate leaf is untouched
    non_gate = nnx.state(g, nnx.Not(S.Gate))
    for leaf in jax.tree.leaves(nnx.filter_state(updates, nnx.Not(S.Gate))):
        assert float(jnp.abs(leaf).max()) == 0.0
    assert jax.tree.structure(non_gate) is not None
    # l1: lambda * sign; rms scale: times the rms of each group's gates
    _, upd_l1, _ = _penalty_updates(L.surrogate_penalty(macs, lam, kind="l1"), g)
    np.testing.assert_allclose(upd_l1["gates"]["layers/1"][...], lam * np.ones(16), rtol=1e-6)
    _, upd_rms, _ = _penalty_updates(L.surrogate_penalty(macs, lam, scale="rms"), g)
    rms = np.sqrt(np.mean(a0**2))
    np.testing.assert_allclose(upd_rms["gates"]["layers/0"][...], lam * want0 * rms, rtol=1e-4)
    # active feedback: the cost at the thresholded counts, rounded up to the multiple
    g.gates["layers/1"][...] = jnp.zeros(16).at[:5].set(1.0)
    _, _, st = _penalty_updates(L.surrogate_penalty(macs, lam, feedback="active", multiple=4), g)
    np.testing.assert_allclose(
        st.value, _mlp_macs_by_hand(32, 8) / _mlp_macs_by_hand(32, 16), rtol=1e-6
    )


def test_surrogate_penalty_errors():
    model, x = _mlp()
    macs = S.macs(model, x[:1])
    with pytest.raises(TypeError, match="MacCount or a LatencyModel"):
        L.surrogate_penalty({"a": 1}, 1.0)
    with pytest.raises(ValueError, match="kind"):
        L.surrogate_penalty(macs, 1.0, kind="l2")
    with pytest.raises(ValueError, match="feedback"):
        L.surrogate_penalty(macs, 1.0, feedback="real")
    with pytest.raises(ValueError, match="scale"):
        L.surrogate_penalty(macs, 1.0, scale="l2")
    with pytest.raises(ValueError, match="strength"):
        L.surrogate_penalty(macs, -1.0)
    with pytest.raises(ValueError, match="unknown groups"):
        L.surrogate_penalty(macs, 1.0, multiple={"nope": 2})
    tx = L.surrogate_penalty(macs, 1.0)
    plain = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="no jaxcompress.structure.Gate"):
        tx.update(plain, tx.init(plain), plain)
    stray = {"layers/9": S.Gate(jnp.ones(3))}
    with pytest.raises(ValueError, match="not a prunable group of the cost"):
        tx.update(stray, tx.init(stray), stray)
    wrong = {"layers/0": S.Gate(jnp.ones(3))}
    with pytest.raises(ValueError, match=r"shape \(3,\), the cost expects \(32,\)"):
        tx.update(wrong, tx.init(wrong), wrong)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(wrong, tx.init(wrong))


# ---------------------------------------------------------------------------------------------
# Projection
# ---------------------------------------------------------------------------------------------


def test_projection_keeps_gates_nonnegative_and_prunes_below():
    params = {"g": S.Gate(jnp.array([0.5, 0.1, 2.0])), "w": nnx.Param(jnp.array([0.5, 0.5]))}
    updates = {"g": S.Gate(jnp.array([-1.0, 0.0, 0.0])), "w": nnx.Param(jnp.array([-1.0, -1.0]))}
    tx = L.project_nonnegative()
    new = optax.apply_updates(params, tx.update(updates, tx.init(params), params)[0])
    np.testing.assert_array_equal(new["g"][...], np.float32([0.0, 0.1, 2.0]))
    np.testing.assert_array_equal(new["w"][...], [-0.5, -0.5])  # not a gate
    tx = L.project_nonnegative(prune_below=0.1)
    new = optax.apply_updates(params, tx.update(updates, tx.init(params), params)[0])
    np.testing.assert_array_equal(new["g"][...], np.float32([0.0, 0.0, 2.0]))  # 0.1 < 0.1 * 2 -> 0
    with pytest.raises(ValueError, match="prune_below"):
        L.project_nonnegative(prune_below=1.0)


# ---------------------------------------------------------------------------------------------
# Lambda control
# ---------------------------------------------------------------------------------------------


def test_pi_and_multiplicative_controller_updates():
    ctrl = L.lambda_controller(50.0, 100.0, lam0=1.0, gain=2.0, mode="pi", ki=0.5, lam_max=10.0)
    st = ctrl.update(ctrl.init(), 0.75)  # error (0.75 - 0.5) / 0.5 = 0.5
    np.testing.assert_allclose(st.lam, 1.0 + 2.0 * 0.5 + 0.5 * 0.5)
    st = ctrl.update(st, 0.25)  # error -0.5, integral 0
    np.testing.assert_allclose(st.lam, 0.0)
    m = L.lambda_controller(1.0, 2.0, lam0=1.0, gain=0.1)
    np.testing.assert_allclose(m.update(m.init(), 1.0).lam, np.exp(0.1), rtol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, 1001.0])
def test_controller_target_must_lie_in_0_dense(bad):
    macs = S.MacCount({("a",): 10}, {"a": 100})
    with pytest.raises(ValueError, match="0 < target <= dense"):
        L.lambda_controller(bad, macs)


_TOY_MACS = S.MacCount(
    {("a",): 30, ("a", "b"): 5, ("b", "c"): 5, ("c",): 4}, {"a": 16, "b": 32, "c": 16}
)


def _toy(feedback):
    sizes = _TOY_MACS.sizes
    keys = jax.random.split(jax.random.key(0), 6)
    importance = {
        n: jax.random.uniform(k, (s,), minval=0.1, maxval=1.0)
        for (n, s), k in zip(sizes.items(), keys[:3], strict=True)
    }
    ctrl = L.lambda_controller(0.4 * _TOY_MACS.dense, _TOY_MACS, lam0=0.01, gain=0.05)
    tx = optax.chain(
        L.surrogate_penalty(_TOY_MACS, ctrl, feedback=feedback),
        optax.sgd(0.05),
        L.project_nonnegative(),
    )

    def task(p):  # every gate wants to be 1, some more than others
        return sum(jnp.sum(importance[n] * (p[n][...] - 1.0) ** 2) for n in p)

    def step(carry, _):
        p, s = carry
        u, s = tx.update(jax.grad(task)(p), s, p)
        return (optax.apply_updates(p, u), s), None

    # unequal start (at equal gates the ratio's gradient vanishes)
    params = {
        n: S.Gate(jax.random.uniform(k, (s,), minval=0.95, maxval=1.0))
        for (n, s), k in zip(sizes.items(), keys[3:], strict=True)
    }
    (params, state), _ = jax.jit(lambda c: jax.lax.scan(step, c, None, length=800))(
        (params, tx.init(params))
    )
    return {n: np.asarray(v[...]) for n, v in params.items()}, state[0]


def test_controller_drives_the_surrogate_cost_to_its_target():
    gates, state = _toy("surrogate")
    counts = {n: _r(a) for n, a in gates.items()}
    ratio_ = _TOY_MACS(counts) / _TOY_MACS.dense
    assert abs(ratio_ - 0.4) < 0.05 * 0.4
    np.testing.assert_allclose(state.value, ratio_, rtol=1e-4)
    assert all(a.min() >= 0 for a in gates.values())


def test_controller_with_active_feedback_drives_the_real_cost_to_its_target():
    gates, state = _toy("active")
    kept = {n: max(1, int(((a >= 1e-2 * a.max()) & (a > 0)).sum())) for n, a in gates.items()}
    real = _TOY_MACS(kept) / _TOY_MACS.dense
    assert abs(real - 0.4) < 0.05 * 0.4
    np.testing.assert_allclose(state.value, real, rtol=1e-6)


def test_active_feedback_with_some_groups_ungated_counts_them_at_full_size():
    # gates only on "a" and "b"; "c" has no Gate and counts at its full size (16)
    params = {"a": S.Gate(jnp.linspace(0.0, 1.0, 16)), "b": S.Gate(jnp.ones(32))}
    tx = L.surrogate_penalty(_TOY_MACS, 0.1, feedback="active", multiple=4)
    _, state = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    kept_a = int((np.linspace(0.0, 1.0, 16) >= 1e-2).sum())  # 15 above tau, rounded up to 16
    want = _TOY_MACS({"a": -(-kept_a // 4) * 4, "b": 32, "c": 16}) / _TOY_MACS.dense
    np.testing.assert_allclose(state.value, want, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Latency model
# ---------------------------------------------------------------------------------------------


def _synthetic_latency():
    ax_a = np.array([2.0, 4.0, 8.0])
    ax_b = np.array([4.0, 8.0])
    times = np.array([[1.0, 2.0], [2.0, 3.0], [1.5, 5.0]])  # not monotone in a
    terms = (
        ("op0", ("a", "b"), (ax_a, ax_b), times),
        ("op1", ("b",), (ax_b,), np.array([0.5, 1.0])),
        ("op2", (), (), np.array(0.25)),
    )
    return L.LatencyModel(terms, {"a": 8, "b": 8}, overhead=0.5)


def test_latency_model_interpolates_multilinearly_and_is_differentiable():
    lat = _synthetic_latency()
    assert lat.dense == pytest.approx(5.0 + 1.0 + 0.25 + 0.5)
    # a = 3 (halfway 2..4), b = 6 (halfway 4..8): bilinear = mean of the four corners
    want = 0.5 + np.mean([1.0, 2.0, 2.0, 3.0]) + 0.75 + 0.25
    np.testing.assert_allclose(lat({"a": 3.0, "b": 6.0}), want, rtol=1e-6)
    grad = jax.grad(lambda c: lat(c))({"a": 3.0, "b": 6.0})
    np.testing.assert_allclose(grad["a"], 0.5 * (1.0 / 2 + 1.0 / 2), rtol=1e-5)
    np.testing.assert_allclose(grad["b"], 0.5 * (1.0 / 4 + 1.0 / 4) + 0.5 / 4, rtol=1e-5)
    gates = {"a": jnp.ones(8), "b": jnp.ones(8)}
    np.testing.assert_allclose(L.regularizer(gates, lat), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="does not vary"):
        lat({"z": 1})


def test_latency_model_monotone_envelope_and_fastest_widths():
    lat = _synthetic_latency()
    env = lat.monotone()
    np.testing.assert_array_equal(env.terms[0][3], [[1.0, 2.0], [1.5, 3.0], [1.5, 5.0]])
    # at a = 4, b = 4: widening a to 8 makes op0 faster (2.0 -> 1.5)
    assert lat.fastest_widths({"a": 4, "b": 4}) == {"a": 8, "b": 4}
    assert lat.fastest_widths({"a": 4, "b": 4}, min_gain=0.5) == {"a": 4, "b": 4}
    assert env.fastest_widths({"a": 4, "b": 4}) == {"a": 4, "b": 4}


def test_latency_model_round_trips_through_json_and_a_timing_table(tmp_path):
    lat = _synthetic_latency()
    lat.save(tmp_path / "lat.json")
    back = L.LatencyModel.load(tmp_path / "lat.json")
    table = lat.to_table()
    assert isinstance(table, TimingTable)
    again = L.LatencyModel.from_table(TimingTable.from_json(table.to_json()), lat.sizes)
    for other in (back, again):
        assert other.dense == pytest.approx(lat.dense)
        for c in ({"a": 3.0, "b": 5.0}, {"a": 8.0, "b": 4.0}):
            np.testing.assert_allclose(other(c), lat(c), rtol=1e-6)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a saved LatencyModel"):
        L.LatencyModel.load(tmp_path / "bad.json")


def test_latency_model_validation():
    with pytest.raises(ValueError, match="must end at its size"):
        L.LatencyModel((("t", ("a",), (np.array([1.0, 2.0]),), np.ones(2)),), {"a": 4})
    with pytest.raises(ValueError, match="times shape"):
        L.LatencyModel((("t", ("a",), (np.array([1.0, 4.0]),), np.ones(3)),), {"a": 4})


def test_measure_latency_model_times_every_contraction_of_the_traced_model():
    model = jc.models.MLP(in_features=12, hidden=(8, 4), num_classes=3, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 12))
    lat = L.measure_latency_model(model, x, grid=(0.5, 1.0), repeats=2, warmup=1)
    # one term per dot_general, depending on the groups of its operands
    assert [t[1] for t in lat.terms] == [("layers/0",), ("layers/0", "layers/1"), ("layers/1",)]
    assert [t[2][0].tolist() for t in lat.terms[:1]] == [[4.0, 8.0]]
    assert lat.sizes == {"layers/0": 8, "layers/1": 4}
    assert lat.dense > 0 and np.isfinite(lat.dense)
    assert float(lat({"layers/0": 4, "layers/1": 2})) >= 0
    with pytest.raises(ValueError, match="not a prunable group"):
        L.measure_latency_model(model, x, groups=["head"])
    with pytest.raises(ValueError, match="grid"):
        L.measure_latency_model(model, x, grid=(0.0, 1.0))
    assert L.measure_latency(model, x, repeats=3, warmup=1) > 0


def test_surrogate_step_compiles_once():
    traces = []
    params = {"a": S.Gate(jnp.linspace(0.1, 1.0, 16)), "b": S.Gate(jnp.linspace(1.0, 0.2, 32))}
    ctrl = L.lambda_controller(0.5 * _TOY_MACS.dense, _TOY_MACS)
    tx = optax.chain(L.surrogate_penalty(_TOY_MACS, ctrl), optax.sgd(0.1), L.project_nonnegative())

    @jax.jit
    def step(p, s):
        traces.append(1)
        u, s = tx.update(jax.tree.map(jnp.zeros_like, p), s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    for _ in range(3):
        params, state = step(params, state)
    assert len(traces) == 1
    assert int(state[0].count) == 3


def test_module_docstring_example_runs():
    doc = L.__doc__
    code = doc[doc.index("Typical use (runs as written)::") :].split("::", 1)[1]
    lines = [line[4:] for line in code.splitlines() if line.startswith("    ") or not line.strip()]
    scope: dict = {}
    exec(compile("\n".join(lines), "<jaxcompress.latency docstring>", "exec"), scope)
    small = scope["small"]
    assert isinstance(small.model, jc.models.SmallCNN)
    assert small.macs == S.macs(small.model, scope["x"][:1]).dense
    assert all(c % 4 == 0 for c in small.kept.values())


def test_latency_form_of_the_penalty_under_jit():
    lat = _synthetic_latency()
    params = {"a": S.Gate(jnp.linspace(0.2, 1.0, 8)), "b": S.Gate(jnp.linspace(1.0, 0.1, 8))}
    ctrl = L.lambda_controller(0.5 * lat.dense, lat)
    for feedback in ("surrogate", "active"):
        tx = L.surrogate_penalty(lat, ctrl, feedback=feedback)
        zeros = jax.tree.map(jnp.zeros_like, params)
        updates, state = jax.jit(tx.update)(zeros, tx.init(params), params)
        gates = {n: v[...] for n, v in params.items()}
        want = jax.grad(lambda g: L.regularizer(g, lat))(gates)
        np.testing.assert_allclose(updates["a"][...], 1e-2 * want["a"], rtol=1e-5)
        if feedback == "active":  # every gate >= 1e-2 * max: the dense latency
            np.testing.assert_allclose(state.value, 1.0, rtol=1e-6)
        else:
            counts = {n: _r(v) for n, v in gates.items()}
            np.testing.assert_allclose(state.value, float(lat(counts)) / lat.dense, rtol=1e-5)
