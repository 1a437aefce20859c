"""Tests for jaxcompress.optim.cram (CrAM / CrAM+, Peste et al., ICLR 2023).

The parity test compares the transform with an independent NumPy oracle of one CrAM step written
from the reference semantics (algorithms.md 1.2): dense gradient, perturbation of every param,
Top-K of the perturbed kernels, second gradient at the compressed point, optional gradient mask,
CrAM+ sum, then torch-style SGD with momentum and coupled weight decay.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _util import count_compiles, jit_counting
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcompress.optim._cram import CramState, cram

# ---------------------------------------------------------------------------------------------
# A tiny MLP: tanh hidden layer, softmax cross-entropy. NumPy forward and hand-written gradients.
# ---------------------------------------------------------------------------------------------

KERNELS = ("dense1/kernel", "dense2/kernel")


def _np_params(rng, dims=(6, 7, 3)):
    d_in, hidden, out = dims
    return {
        "dense1/kernel": rng.normal(size=(d_in, hidden)) / np.sqrt(d_in),
        "dense1/bias": rng.normal(size=(hidden,)) * 0.1,
        "dense2/kernel": rng.normal(size=(hidden, out)) / np.sqrt(hidden),
        "dense2/bias": rng.normal(size=(out,)) * 0.1,
    }


def _np_grads(theta, x, y):
    """Analytic gradients of mean softmax cross-entropy of ``tanh(x W1 + b1) W2 + b2``."""
    h = np.tanh(x @ theta["dense1/kernel"] + theta["dense1/bias"])
    z = h @ theta["dense2/kernel"] + theta["dense2/bias"]
    z = z - z.max(axis=1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    dz = (prob - np.eye(z.shape[1])[y]) / x.shape[0]
    dh = dz @ theta["dense2/kernel"].T
    da = dh * (1.0 - h**2)
    return {
        "dense1/kernel": x.T @ da,
        "dense1/bias": da.sum(axis=0),
        "dense2/kernel": h.T @ dz,
        "dense2/bias": dz.sum(axis=0),
    }


def _nest(flat):
    out = {}
    for name, value in flat.items():
        layer, leaf = name.split("/")
        out.setdefault(layer, {})[leaf] = jnp.asarray(value)
    return out


def _flat(nested):
    return {
        f"{layer}/{leaf}": np.asarray(v) for layer, d in nested.items() for leaf, v in d.items()
    }


def _jax_loss(params, x, y):
    h = jnp.tanh(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
    z = h @ params["dense2"]["kernel"] + params["dense2"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()


def _oracle_masks(pert, sparsity, *, scope, strict):
    """Top-K of |w| over the kernels: keep ceil(N(1-s)); strict ``|w| > thr`` if ``strict``."""
    groups = [list(KERNELS)] if scope == "global" else [[k] for k in KERNELS]
    masks = {}
    for names in groups:
        mags = np.concatenate([np.abs(pert[k]).ravel() for k in names])
        k_keep = math.ceil(mags.size * (1.0 - sparsity))
        thr = np.sort(mags)[::-1][k_keep - 1]
        for k in names:
            masks[k] = np.abs(pert[k]) > thr if strict else np.abs(pert[k]) >= thr
    return masks


def _oracle_step(theta, buf, x, y, *, rho, sparsity, lr, momentum, wd, **flags):
    plus, sparse_grad, scope, strict, normalize = (
        flags[k] for k in ("plus", "sparse_grad", "scope", "strict", "normalize")
    )
    g = _np_grads(theta, x, y)
    scale = rho
    if normalize:
        scale = rho / (np.sqrt(sum(np.sum(v**2) for v in g.values())) + 1e-12)
    pert = {k: theta[k] + scale * g[k] for k in theta}  # every param, biases included
    masks = _oracle_masks(pert, sparsity, scope=scope, strict=strict)
    compressed = {k: pert[k] * masks[k] if k in masks else pert[k] for k in theta}
    g_c = _np_grads(compressed, x, y)
    if sparse_grad:
        g_c = {k: g_c[k] * masks[k] if k in masks else g_c[k] for k in theta}
    final = {k: g_c[k] + g[k] if plus else g_c[k] for k in theta}
    # torch.optim.SGD(lr, momentum, weight_decay), no dampening/Nesterov: d = grad + wd * p,
    # buf = d at the first step, then momentum * buf + d; p -= lr * buf.
    d = {k: final[k] + wd * theta[k] for k in theta}
    buf = d if buf is None else {k: momentum * buf[k] + d[k] for k in theta}
    return {k: theta[k] - lr * buf[k] for k in theta}, buf, masks


def _grad_step(tx, loss):
    """A jitted ``(params, state, x, y) -> (params, state)`` step with ``grad_fn`` on the batch
    (``step.traces`` counts its traces)."""

    @jit_counting
    def step(params, state, x, y):
        grads = jax.grad(loss)(params, x, y)
        updates, state = tx.update(grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, x, y))
        return optax.apply_updates(params, updates), state

    return step


# ---------------------------------------------------------------------------------------------
# Parity with the NumPy oracle
# ---------------------------------------------------------------------------------------------


def test_numpy_gradients_are_correct():
    rng = np.random.default_rng(3)
    theta = _np_params(rng)
    x, y = rng.normal(size=(5, 6)), rng.integers(0, 3, size=5)
    with jax.enable_x64(True):
        expected = _flat(jax.grad(_jax_loss)(_nest(theta), jnp.asarray(x), jnp.asarray(y)))
    for k, v in _np_grads(theta, x, y).items():
        np.testing.assert_allclose(v, expected[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "plus, sparse_grad, scope, strict, normalize",
    [
        (True, True, "global", False, False),  # CrAM+ with sparse intermediate gradient
        (True, False, "global", False, False),  # straight-through gradient
        (False, True, "global", True, False),  # CrAM, reference strict-threshold ties
        (True, True, "layer", False, True),  # per-layer masks, SAM-normalised perturbation
    ],
)
def test_matches_numpy_oracle(plus, sparse_grad, scope, strict, normalize):
    rng = np.random.default_rng(0)
    theta = _np_params(rng)  # 63 kernel weights: ceil(63 * 0.4) = 26 kept (17 + 9 per layer)
    batches = [(rng.normal(size=(5, 6)), rng.integers(0, 3, size=5)) for _ in range(3)]
    hp = dict(rho=0.3, sparsity=0.6, lr=0.1, momentum=0.9, wd=5e-4)
    flags = dict(
        plus=plus, sparse_grad=sparse_grad, scope=scope, strict=strict, normalize=normalize
    )
    with jax.enable_x64(True):
        tx = cram(
            optax.chain(optax.add_decayed_weights(hp["wd"]), optax.sgd(hp["lr"], hp["momentum"])),
            rho=hp["rho"],
            sparsities=(hp["sparsity"],),
            compressor=scope,
            plus=plus,
            sparse_grad=sparse_grad,
            normalize_grad=normalize,
            reference_ties=strict,
        )
        params = _nest(theta)
        state = tx.init(params)
        step = _grad_step(tx, _jax_loss)
        ref, buf = theta, None
        for x, y in batches:
            params, state = step(params, state, jnp.asarray(x), jnp.asarray(y))
            ref, buf, ref_masks = _oracle_step(ref, buf, x, y, **hp, **flags)
            got = _flat(params)
            for k in theta:
                assert got[k].dtype == np.float64
                np.testing.assert_allclose(got[k], ref[k], rtol=1e-9, atol=1e-12, err_msg=k)
            masks = _flat(state.masks)
            for k in KERNELS:
                np.testing.assert_array_equal(masks[k], ref_masks[k], err_msg=k)
            assert state.masks["dense1"]["bias"] is None and state.masks["dense2"]["bias"] is None
        kept = sum(int(ref_masks[k].sum()) for k in KERNELS)
        assert kept == (25 if strict else 26)
        assert int(state.count) == 3
        assert float(state.sparsity) == pytest.approx(0.6)


def test_rho_zero_compresses_the_current_weights():
    """With rho = 0 the CrAM+ direction is g + M ⊙ ∇L(M ⊙ θ), M = TopK(θ)."""
    rng = np.random.default_rng(1)
    theta = _np_params(rng)
    x, y = rng.normal(size=(5, 6)), rng.integers(0, 3, size=5)
    tx = cram(optax.sgd(1.0), rho=0.0, sparsities=(0.5,))
    params = _nest(theta)
    new, state = _grad_step(tx, _jax_loss)(params, tx.init(params), jnp.asarray(x), jnp.asarray(y))
    masks = _oracle_masks(theta, 0.5, scope="global", strict=False)
    compressed = {k: theta[k] * masks[k] if k in masks else theta[k] for k in theta}
    g, g_c = _np_grads(theta, x, y), _np_grads(compressed, x, y)
    for k, v in _flat(new).items():
        expected = theta[k] - g[k] - (g_c[k] * masks[k] if k in masks else g_c[k])
        np.testing.assert_allclose(v, expected, rtol=1e-5, atol=1e-6, err_msg=k)


# ---------------------------------------------------------------------------------------------
# Multi, N:M, compilation
# ---------------------------------------------------------------------------------------------


def _sin_problem(shapes, seed=0):
    """Params of the given kernel shapes plus a bias; loss sum(sin(w) * c), fixed random c."""
    rng = np.random.default_rng(seed)
    params = {name: {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32)} for name, s in shapes}
    params["head"] = {"bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
    coef = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)

    def loss(p, x, y):
        del x, y
        terms = jax.tree.map(lambda w, c: jnp.sum(jnp.sin(w) * c), p, coef)
        return sum(jax.tree.leaves(terms))

    return params, loss


def _run_scan(tx, params, loss, num_steps):
    """``num_steps`` updates in one ``lax.scan``; returns the per-step states' logged fields."""

    @jax.jit
    def run(params, state):
        def body(carry, _):
            p, s = carry
            grads = jax.grad(loss)(p, None, None)
            upd, s = tx.update(grads, s, p, grad_fn=lambda q: jax.grad(loss)(q, None, None))
            return (optax.apply_updates(p, upd), s), (s.choice, s.sparsity, s.masks)

        return jax.lax.scan(body, (params, state), None, length=num_steps)[1]

    return run(params, tx.init(params))


def test_multi_draws_cover_the_sparsities_and_are_reproducible():
    sparsities = (0.3, 0.5, 0.7, 0.9)
    params, loss = _sin_problem([("a", (6, 7)), ("b", (7, 3))])  # N = 63
    make = lambda seed: cram(optax.sgd(0.01), rho=0.05, sparsities=sparsities, seed=seed)
    choice, sparsity, masks = _run_scan(make(0), params, loss, 200)
    choice, sparsity = np.asarray(choice), np.asarray(sparsity)
    counts = np.bincount(choice, minlength=4)
    assert counts.sum() == 200 and counts.min() >= 25 and counts.max() <= 75, counts
    np.testing.assert_allclose(sparsity, np.asarray(sparsities, np.float32)[choice])
    # Every step's mask keeps exactly ceil(63 (1 - s)) weights of the drawn s.
    kept = sum(np.asarray(masks[name]["kernel"]).sum((1, 2)) for name in ("a", "b"))
    expected = np.array([math.ceil(63 * (1 - s)) for s in sparsities])[choice]
    np.testing.assert_array_equal(kept, expected)
    assert masks["head"]["bias"] is None
    again, _, _ = _run_scan(make(0), params, loss, 200)
    np.testing.assert_array_equal(np.asarray(again), choice)
    other, _, _ = _run_scan(make(1), params, loss, 200)
    assert not np.array_equal(np.asarray(other), choice)


def _nm_valid(mask, n, m):
    groups = np.moveaxis(np.asarray(mask), -2, -1)
    groups = groups.reshape(*groups.shape[:-1], groups.shape[-1] // m, m)
    return bool(np.all(groups.sum(-1) == n))


def test_nm_compressor_gives_valid_2_4_and_4_8_masks():
    params, loss = _sin_problem([("dense", (16, 8)), ("conv", (3, 3, 8, 4))])
    tx = cram(optax.sgd(0.01), rho=0.05, compressor="nm")
    choice, sparsity, masks = _run_scan(tx, params, loss, 24)
    choice = np.asarray(choice)
    assert set(choice.tolist()) == {0, 1}
    np.testing.assert_allclose(np.asarray(sparsity), 0.5)
    patterns = ((2, 4), (4, 8))
    for t, c in enumerate(choice):
        n, m = patterns[c]
        for name in ("dense", "conv"):
            mask = masks[name]["kernel"][t]
            assert _nm_valid(mask, n, m), (t, name, n, m)
    # Some 4:8 masks are not 2:4 masks: the pattern really changes between steps.
    valid_24 = [_nm_valid(masks["dense"]["kernel"][t], 2, 4) for t in range(len(choice))]
    assert not all(valid_24)
    assert masks["head"]["bias"] is None


def test_nm_single_pattern_and_bad_shape_raise_at_init():
    params, loss = _sin_problem([("dense", (16, 8))])
    choice, _, masks = _run_scan(
        cram(optax.sgd(0.01), rho=0.05, compressor="nm", nm_patterns=((1, 4),)), params, loss, 3
    )
    assert all(_nm_valid(masks["dense"]["kernel"][t], 1, 4) for t in range(3))
    np.testing.assert_array_equal(np.asarray(choice), 0)
    bad, _ = _sin_problem([("dense", (6, 8))])
    with pytest.raises(ValueError, match="not divisible by m=4"):
        cram(optax.sgd(0.01), rho=0.05, compressor="nm").init(bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(sparsities=(0.5, 0.7, 0.9)),
        dict(sparsities=(0.8,), compressor="layer"),
        dict(compressor="nm"),
    ],
)
def test_second_jitted_update_does_not_recompile(kwargs):
    params, loss = _sin_problem([("dense", (16, 8)), ("conv", (3, 3, 8, 4))])
    tx = cram(optax.adam(1e-3), rho=0.1, **kwargs)
    step = _grad_step(tx, loss)
    state = tx.init(params)
    params, state = step(params, state, None, None)
    with count_compiles() as counter:
        for _ in range(2):
            params, state = step(params, state, None, None)
    assert step.traces == 1 and counter.compiles == 0
    assert int(state.count) == 3


# ---------------------------------------------------------------------------------------------
# Composition: inject_hyperparams, schedules, MultiSteps, BatchNorm via jaxcompress.train
# ---------------------------------------------------------------------------------------------


def _allclose_trees(a, b, **kw):
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=str(path), **kw)


def test_inject_hyperparams_rho():
    params, loss = _sin_problem([("dense", (16, 8))])
    inner = optax.sgd(0.1, momentum=0.9)
    tx = optax.inject_hyperparams(cram)(inner, rho=0.2, sparsities=(0.5, 0.7))
    state = tx.init(params)
    assert float(state.hyperparams["rho"]) == pytest.approx(0.2)
    step = _grad_step(tx, loss)
    p1, s1 = step(params, state, None, None)
    ref_tx = cram(inner, rho=0.2, sparsities=(0.5, 0.7))
    q1, _ = _grad_step(ref_tx, loss)(params, ref_tx.init(params), None, None)
    _allclose_trees(p1, q1, rtol=1e-6)
    # Changing the injected value changes the step, without recompiling.
    s1.hyperparams["rho"] = jnp.asarray(0.0, jnp.float32)
    with count_compiles() as counter:
        p2, _ = step(p1, s1, None, None)
    assert step.traces == 1 and counter.compiles == 0
    zero_tx = cram(inner, rho=0.0, sparsities=(0.5, 0.7))
    q2, _ = _grad_step(zero_tx, loss)(p1, s1.inner_state, None, None)
    _allclose_trees(p2, q2, rtol=1e-6)
    # A custom selector must be declared static (inject_hyperparams schedules callables).
    only_dense = lambda path, leaf: leaf.ndim == 2
    tx_w = optax.inject_hyperparams(cram, static_args="where")(
        inner, rho=0.2, sparsities=(0.5,), where=only_dense
    )
    _, sw = _grad_step(tx_w, loss)(params, tx_w.init(params), None, None)
    assert sw.inner_state.masks["dense"]["kernel"].mean() == 0.5


def test_rho_schedule_is_evaluated_at_the_step_count():
    params, loss = _sin_problem([("dense", (16, 8))])
    schedule = lambda count: jnp.where(count < 1, 0.0, 0.5)  # rho = 0 at step 0, then 0.5
    inner = optax.sgd(0.1)
    tx = cram(inner, rho=schedule, sparsities=(0.6,))
    step = _grad_step(tx, loss)
    p, s = step(params, tx.init(params), None, None)
    p, s = step(p, s, None, None)
    tx0, tx1 = cram(inner, rho=0.0, sparsities=(0.6,)), cram(inner, rho=0.5, sparsities=(0.6,))
    q, r = _grad_step(tx0, loss)(params, tx0.init(params), None, None)
    q, _ = _grad_step(tx1, loss)(q, r, None, None)
    _allclose_trees(p, q, rtol=1e-6)


def test_multisteps_forwards_grad_fn():
    rng = np.random.default_rng(2)
    theta = jax.tree.map(lambda v: v.astype(jnp.float32), _nest(_np_params(rng)))
    xa, ya = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32), jnp.asarray([0, 1, 2, 0, 1])
    xb, yb = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32), jnp.asarray([2, 2, 1, 0, 0])
    make = lambda: cram(optax.adam(1e-2), rho=0.1, sparsities=(0.5, 0.8), seed=4)
    grad = lambda x, y: jax.grad(_jax_loss)(theta, x, y)
    grad_fn = lambda x, y: lambda p: jax.grad(_jax_loss)(p, x, y)
    acc = optax.MultiSteps(make(), every_k_schedule=2)

    @jax.jit
    def two_micro_steps():
        state = acc.init(theta)
        u1, state = acc.update(grad(xa, ya), state, theta, grad_fn=grad_fn(xa, ya))
        u2, state = acc.update(grad(xb, yb), state, theta, grad_fn=grad_fn(xb, yb))
        return u1, u2, state

    @jax.jit
    def direct_step():
        # CrAM at the mean gradient, second pass on the emitting micro-batch.
        tx = make()
        mean_g = jax.tree.map(lambda a, b: (a + b) / 2, grad(xa, ya), grad(xb, yb))
        return tx.update(mean_g, tx.init(theta), theta, grad_fn=grad_fn(xb, yb))

    u1, u2, state = two_micro_steps()
    ref, ref_state = direct_step()
    assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree.leaves(u1))
    _allclose_trees(u2, ref, rtol=1e-5, atol=1e-7)
    assert isinstance(state.inner_opt_state, CramState)
    assert int(state.inner_opt_state.count) == 1
    np.testing.assert_array_equal(state.inner_opt_state.key, ref_state.key)


def test_batchnorm_running_stats_come_from_the_first_pass_only():
    from jaxcompress import train
    from jaxcompress.models import SmallCNN

    model = SmallCNN(1, 10, (4, 8), rngs=nnx.Rngs(0))
    graphdef, params, rest = train.split_model(train.train_view(model))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 8, 8, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=8), jnp.int32)
    tx = cram(optax.sgd(0.1, momentum=0.9), rho=0.5, sparsities=(0.7,))
    step = train.make_train_step(graphdef, tx, pass_grad_fn=True, donate=False)
    p_cram, r_cram, state, _ = step(params, rest, tx.init(params), x, y)
    plain = optax.sgd(0.1, momentum=0.9)
    base = train.make_train_step(graphdef, plain, donate=False)
    p_sgd, r_sgd, _, _ = base(params, rest, plain.init(params), x, y)
    # The running statistics equal those of a single dense pass (the second pass, at the
    # compressed point with different batch statistics, left no trace) and did change.
    stats_cram, stats_sgd, stats_0 = (jax.tree.leaves(r) for r in (r_cram, r_sgd, rest))
    for a, b in zip(stats_cram, stats_sgd, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(a, b) for a, b in zip(stats_cram, stats_0, strict=True))
    # CrAM did take a different step than plain SGD, and its masks cover conv and head kernels.
    diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), p_cram, p_sgd)
    assert max(jax.tree.leaves(diff)) > 1e-4
    kernels = jax.tree.leaves(state.masks)
    assert len(kernels) == 3  # two convs and the head; BN scales/biases are not compressed
    total = sum(m.size for m in kernels)
    assert sum(int(m.sum()) for m in kernels) == math.ceil(total * 0.3)


# ---------------------------------------------------------------------------------------------
# Sharding and data parallelism (8 emulated CPU devices, see conftest.py)
# ---------------------------------------------------------------------------------------------


def _wide_problem(seed=0):
    rng = np.random.default_rng(seed)
    theta = _np_params(rng, dims=(16, 32, 8))
    params = jax.tree.map(lambda v: v.astype(jnp.float32), _nest(theta))
    x = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 8, size=64), jnp.int32)
    return params, x, y


def test_sharded_run_equals_single_device_run():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 emulated CPU devices)")
    params, x, y = _wide_problem()
    tx = cram(optax.adam(1e-2), rho=0.1, sparsities=(0.5, 0.9), seed=1)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    specs = {
        "dense1": {"kernel": P(None, "model"), "bias": P("model")},
        "dense2": {"kernel": P("model", None), "bias": P()},
    }
    shard = lambda tree: jax.tree.map(
        lambda v, s: jax.device_put(v, NamedSharding(mesh, s)), tree, specs
    )
    sp = shard(params)
    sx = jax.device_put(x, NamedSharding(mesh, P("data")))
    sy = jax.device_put(y, NamedSharding(mesh, P("data")))
    s_state = tx.init(sp)
    mask_sharding = s_state.masks["dense1"]["kernel"].sharding
    assert mask_sharding.is_equivalent_to(sp["dense1"]["kernel"].sharding, 2)
    sstep, step = _grad_step(tx, _jax_loss), _grad_step(tx, _jax_loss)
    state = tx.init(params)
    compiles = []
    for _ in range(3):
        with count_compiles() as counter:
            sp, s_state = sstep(sp, s_state, sx, sy)
        compiles.append(counter.compiles)
        params, state = step(params, state, x, y)
    _allclose_trees(sp, params, rtol=2e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s_state.masks), jax.tree.leaves(state.masks), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(s_state.choice), np.asarray(state.choice))
    assert len(sp["dense1"]["kernel"].sharding.device_set) == 8
    # init places the scalar state leaves replicated on the params' mesh, as the jitted update
    # returns them: one trace, one compilation for the whole run.
    assert sstep.traces == 1 and compiles[0] >= 1 and compiles[1:] == [0, 0], compiles


def test_shard_map_with_batch_axis_name_equals_global_batch():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 emulated CPU devices)")
    params, x, y = _wide_problem(1)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    make = lambda axis: cram(
        optax.sgd(0.1, momentum=0.9), rho=0.2, sparsities=(0.6, 0.8), batch_axis_name=axis
    )
    dp = make("data")

    # check_vma=False: each device differentiates its own loss, so the gradients are local (as
    # under pmap or DDP before its all-reduce) and CrAM must average them. With the default
    # check_vma=True, autodiff already psums the gradients of replicated params.
    def local_step(p, s, xb, yb):
        grads = jax.grad(_jax_loss)(p, xb, yb)  # per-device gradient; CrAM averages it
        upd, s = dp.update(grads, s, p, grad_fn=lambda q: jax.grad(_jax_loss)(q, xb, yb))
        return optax.apply_updates(p, upd), s

    dp_step = jax.jit(
        jax.shard_map(
            local_step,
            mesh=mesh,
            in_specs=(P(), P(), P("data"), P("data")),
            out_specs=(P(), P()),
            check_vma=False,
        )
    )
    single = make(None)
    p_dp, s_dp = params, dp.init(params)
    p_1, s_1 = params, single.init(params)
    step_1 = _grad_step(single, _jax_loss)
    for _ in range(2):
        p_dp, s_dp = dp_step(p_dp, s_dp, x, y)
        p_1, s_1 = step_1(p_1, s_1, x, y)
    _allclose_trees(p_dp, p_1, rtol=2e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s_dp.masks), jax.tree.leaves(s_1.masks), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

SGD = optax.sgd(0.1)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(rho=-0.1, sparsities=(0.5,)), ValueError, "rho"),
        (dict(rho=float("nan"), sparsities=(0.5,)), ValueError, "rho"),
        (dict(rho="0.1", sparsities=(0.5,)), TypeError, "rho"),
        (dict(rho=True, sparsities=(0.5,)), TypeError, "rho"),
        (dict(rho=jnp.ones(2), sparsities=(0.5,)), TypeError, "rho"),
        (dict(rho=0.1, sparsities=()), ValueError, "sparsities"),
        (dict(rho=0.1, sparsities=None), ValueError, "sparsities"),
        (dict(rho=0.1, sparsities=0.5), TypeError, "sparsities"),
        (dict(rho=0.1, sparsities=(0.5, 1.0)), ValueError, r"sparsities\[1\]"),
        (dict(rho=0.1, sparsities=(-0.1,)), ValueError, r"sparsities\[0\]"),
        (dict(rho=0.1, sparsities=("0.5",)), TypeError, r"sparsities\[0\]"),
        (dict(rho=0.1, sparsities=(0.5,), compressor="topk"), ValueError, "compressor"),
        (dict(rho=0.1, sparsities=(0.5,), compressor="nm"), ValueError, "sparsities"),
        (dict(rho=0.1, compressor="nm", nm_patterns=((4, 2),)), ValueError, "nm_patterns"),
        (dict(rho=0.1, compressor="nm", nm_patterns=((0, 4),)), ValueError, "nm_patterns"),
        (dict(rho=0.1, compressor="nm", nm_patterns=((2, 4, 8),)), TypeError, "nm_patterns"),
        (dict(rho=0.1, compressor="nm", nm_patterns=((2.0, 4),)), TypeError, "nm_patterns"),
        (dict(rho=0.1, compressor="nm", nm_patterns=()), ValueError, "nm_patterns"),
        (dict(rho=0.1, sparsities=(0.5,), nm_patterns=((3, 3),)), ValueError, "nm_patterns"),
        (dict(rho=0.1, sparsities=(0.5,), plus=1), TypeError, "plus"),
        (dict(rho=0.1, sparsities=(0.5,), sparse_grad="yes"), TypeError, "sparse_grad"),
        (dict(rho=0.1, sparsities=(0.5,), normalize_grad=None), TypeError, "normalize_grad"),
        (dict(rho=0.1, sparsities=(0.5,), where="kernel"), TypeError, "where"),
        (dict(rho=0.1, sparsities=(0.5,), seed=1.5), TypeError, "seed"),
        (dict(rho=0.1, sparsities=(0.5,), batch_axis_name=0), TypeError, "batch_axis_name"),
        (dict(rho=0.1, sparsities=(0.5,), reference_ties="no"), TypeError, "reference_ties"),
    ],
)
def test_bad_arguments_raise_in_the_factory(kwargs, error, match):
    with pytest.raises(error, match=match):
        cram(SGD, **kwargs)


def test_bad_inner_and_update_calls():
    with pytest.raises(TypeError, match="inner"):
        cram(lambda g: g, rho=0.1, sparsities=(0.5,))
    params, loss = _sin_problem([("dense", (16, 8))])
    tx = cram(SGD, rho=0.1, sparsities=(0.5,))
    state = tx.init(params)
    grads = jax.grad(loss)(params, None, None)
    with pytest.raises(TypeError, match="grad_fn"):
        tx.update(grads, state, params)
    with pytest.raises(TypeError, match="grad_fn"):
        tx.update(grads, state, params, grad_fn=3)
    with pytest.raises(ValueError, match="needs the current params"):
        tx.update(grads, state, None, grad_fn=lambda p: grads)
    with pytest.raises(ValueError, match="structure"):
        jax.eval_shape(lambda: tx.update(grads, state, params, grad_fn=lambda p: p["dense"]))
