"""Tests for jaxcompress.optim.fixed_mask: fixed-support training keeps pruned weights at 0."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _optim_loops import dense_out_params
from _util import count_compiles, jit_counting
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcompress.optim import FixedMaskState, fixed_mask, masked_params

NUM_STEPS = 200


def _problem(seed=0):
    """A small two-layer linear regression with a mask on both kernels and an unpruned bias."""
    rng = np.random.default_rng(seed)
    params = dense_out_params(rng)
    masks = {
        "dense": {"kernel": rng.random((16, 8)) < 0.5, "bias": None},
        "out": {"kernel": rng.random((8, 4)) < 0.6},
    }
    x = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)

    def loss(p):
        h = x @ p["dense"]["kernel"] + p["dense"]["bias"]
        return jnp.mean((h @ p["out"]["kernel"] - y) ** 2)

    return params, masks, loss


def _apply_masks(params, masks):
    return jax.tree.map(
        lambda m, p: p if m is None else jnp.where(m, p, 0.0),
        masks,
        params,
        is_leaf=lambda v: v is None,
    )


def _pruned_abs_sum(params, masks):
    sums = jax.tree.map(
        lambda m, p: jnp.zeros(()) if m is None else jnp.sum(jnp.abs(jnp.where(m, 0.0, p))),
        masks,
        params,
        is_leaf=lambda v: v is None,
    )
    return sum(jax.tree.leaves(sums))


def _train(tx, params, loss, masks_for_check, num_steps=NUM_STEPS):
    """Runs ``num_steps`` jitted steps; returns final params, state and per-step diagnostics."""

    @jax.jit
    def run(params):
        state = tx.init(params)

        def step(carry, _):
            params, state = carry
            grads = jax.grad(loss)(params)
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            return (params, state), (_pruned_abs_sum(params, masks_for_check), loss(params))

        (params, state), (pruned, losses) = jax.lax.scan(step, (params, state), None, num_steps)
        return params, state, pruned, losses

    return run(params)


INNER = {
    "sgd_momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "lion": lambda: optax.lion(1e-3, weight_decay=0.1),
    "adafactor": lambda: optax.adafactor(1e-2, min_dim_size_to_factor=4),
    "clip_chain": lambda: optax.chain(
        optax.clip_by_global_norm(0.5),
        optax.sgd(optax.cosine_decay_schedule(0.05, NUM_STEPS), momentum=0.9, nesterov=True),
    ),
    "inject_hyperparams": lambda: optax.inject_hyperparams(optax.adamw)(
        learning_rate=1e-2, weight_decay=0.1
    ),
}


@pytest.mark.parametrize("name", sorted(INNER))
def test_pruned_entries_stay_exactly_zero(name):
    params, masks, loss = _problem()
    tx = fixed_mask(INNER[name](), masks)
    final, state, pruned, losses = _train(tx, params, loss, masks)
    # The initial params are dense; from the first update on, every pruned entry is exactly 0.
    assert float(_pruned_abs_sum(params, masks)) > 0.0
    np.testing.assert_array_equal(np.asarray(pruned), 0.0)
    for m, p in (
        (masks["dense"]["kernel"], final["dense"]["kernel"]),
        (masks["out"]["kernel"], final["out"]["kernel"]),
    ):
        assert np.all(np.asarray(p)[~m] == 0.0)
        # The kept entries did train.
        assert np.count_nonzero(np.asarray(p)[m]) == m.sum()
    assert not np.allclose(final["dense"]["bias"], params["dense"]["bias"])
    assert float(losses[-1]) < float(loss(_apply_masks(params, masks)))
    assert isinstance(state, FixedMaskState)


@pytest.mark.parametrize("name", sorted(INNER))
def test_matches_inner_on_masked_problem(name):
    """From sparse params, ``fixed_mask(inner)`` is ``inner`` run on theta -> L(m * theta)."""
    params, masks, loss = _problem(seed=1)
    params = _apply_masks(params, masks)
    final, _, _, _ = _train(fixed_mask(INNER[name](), masks), params, loss, masks)

    def masked_loss(p):
        return loss(_apply_masks(p, masks))

    reference, _, _, _ = _train(INNER[name](), params, masked_loss, masks)
    for got, want in zip(jax.tree.leaves(final), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_sgd_momentum_matches_manual_computation():
    params, masks, loss = _problem(seed=2)
    lr, mu, steps = 0.05, 0.9, 50
    final, state, _, _ = _train(
        fixed_mask(optax.sgd(lr, momentum=mu), masks), params, loss, masks, steps
    )

    p = jax.tree.map(np.asarray, params)
    buf = jax.tree.map(np.zeros_like, p)
    first = True
    for _ in range(steps):
        g = jax.tree.map(np.asarray, jax.grad(loss)(jax.tree.map(jnp.asarray, p)))
        g = jax.tree.map(
            lambda m, v: v if m is None else np.where(m, v, 0.0),
            masks,
            g,
            is_leaf=lambda v: v is None,
        )
        buf = g if first else jax.tree.map(lambda b, v: v + mu * b, buf, g)
        first = False
        p = jax.tree.map(lambda w, b: w - lr * b, p, buf)
        p = jax.tree.map(
            lambda m, w: w if m is None else np.where(m, w, 0.0),
            masks,
            p,
            is_leaf=lambda v: v is None,
        )
    for got, want in zip(jax.tree.leaves(final), jax.tree.leaves(p), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The momentum buffer of pruned entries never grows.
    trace = state.inner_state[0].trace
    assert np.all(np.asarray(trace["dense"]["kernel"])[~masks["dense"]["kernel"]] == 0.0)
    assert np.all(np.asarray(trace["out"]["kernel"])[~masks["out"]["kernel"]] == 0.0)


def test_adam_moments_of_pruned_entries_stay_zero():
    params, masks, loss = _problem(seed=3)
    _, state, _, _ = _train(fixed_mask(optax.adam(1e-2), masks), params, loss, masks, 20)
    adam = state.inner_state[0]
    for moment in (adam.mu, adam.nu):
        assert np.all(np.asarray(moment["dense"]["kernel"])[~masks["dense"]["kernel"]] == 0.0)
        assert np.any(np.asarray(moment["dense"]["kernel"])[masks["dense"]["kernel"]] != 0.0)


def test_masks_live_in_state_and_update_uses_them():
    params, masks, loss = _problem()
    tx = fixed_mask(optax.sgd(0.1), masks)
    state = tx.init(params)
    np.testing.assert_array_equal(state.masks["dense"]["kernel"], masks["dense"]["kernel"])
    assert state.masks["dense"]["bias"] is None
    assert state.masks["dense"]["kernel"].dtype == jnp.bool_
    # A state carrying other masks (e.g. restored from a checkpoint) drives the update.
    other = jax.tree.map(lambda m: None if m is None else ~m, masks, is_leaf=lambda v: v is None)
    state = state._replace(masks=jax.tree.map(jnp.asarray, other))
    updates, _ = tx.update(jax.grad(loss)(params), state, params)
    new = optax.apply_updates(params, updates)
    assert np.all(np.asarray(new["dense"]["kernel"])[masks["dense"]["kernel"]] == 0.0)


def test_no_recompilation_on_second_update():
    params, masks, loss = _problem()
    tx = fixed_mask(optax.adamw(1e-2, weight_decay=0.1), masks)
    state = tx.init(params)

    @jit_counting
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    params, state = step(params, state)
    with count_compiles() as counter:
        params, state = step(params, state)
        params, state = step(params, state)
    assert step.traces == 1 and counter.compiles == 0


def test_extra_args_are_forwarded():
    params, masks, loss = _problem()

    def init_fn(params):
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, factor):
        return jax.tree.map(lambda u: -factor * u, updates), state

    inner = optax.GradientTransformationExtraArgs(init_fn, update_fn)
    tx = fixed_mask(inner, masks)
    state = tx.init(params)
    grads = jax.grad(loss)(params)
    u1, _ = tx.update(grads, state, params, factor=1.0)
    u2, _ = tx.update(grads, state, params, factor=2.0)
    m = masks["dense"]["kernel"]
    np.testing.assert_allclose(
        np.asarray(u2["dense"]["kernel"])[m], 2.0 * np.asarray(u1["dense"]["kernel"])[m], rtol=1e-6
    )
    # Plain transformations ignore extra args they do not take.
    tx = fixed_mask(optax.sgd(0.1), masks)
    tx.update(grads, tx.init(params), params, unused_extra=3)


def test_update_without_params_is_an_error():
    params, masks, loss = _problem()
    tx = fixed_mask(optax.sgd(0.1), masks)
    with pytest.raises(ValueError, match="params"):
        tx.update(jax.grad(loss)(params), tx.init(params))


def test_inner_must_be_a_gradient_transformation():
    with pytest.raises(TypeError, match="inner"):
        fixed_mask(lambda g: g, {})


def test_bad_masks_are_rejected_at_init():
    params, masks, _ = _problem()
    bad_shape = {**masks, "out": {"kernel": np.ones((4, 8), bool)}}
    with pytest.raises(ValueError, match="out"):
        fixed_mask(optax.sgd(0.1), bad_shape).init(params)
    bad_structure = {"dense": masks["dense"]}
    with pytest.raises((ValueError, TypeError)):
        fixed_mask(optax.sgd(0.1), bad_structure).init(params)


def test_masked_params_helper():
    params, masks, _ = _problem()
    state = optax.chain(optax.scale(1.0), fixed_mask(optax.sgd(0.1), masks)).init(params)
    sparse = masked_params(params, state)
    assert float(_pruned_abs_sum(sparse, masks)) == 0.0
    np.testing.assert_array_equal(sparse["dense"]["bias"], params["dense"]["bias"])
    with pytest.raises(ValueError, match="state"):
        masked_params(params, optax.sgd(0.1).init(params))


def test_shardings_are_preserved():
    devices = np.array(jax.devices())
    assert devices.size == 8
    mesh = Mesh(devices, ("data",))
    params, masks, loss = _problem()
    specs = {
        "dense": {"kernel": P("data", None), "bias": P("data")},
        "out": {"kernel": P("data", None)},
    }
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda v: isinstance(v, P)
    )
    params = jax.device_put(params, shardings)
    tx = fixed_mask(optax.adamw(1e-2, weight_decay=0.1), masks)
    state = tx.init(params)
    assert state.masks["dense"]["kernel"].sharding.is_equivalent_to(shardings["dense"]["kernel"], 2)
    assert (
        state.inner_state[0]
        .mu["out"]["kernel"]
        .sharding.is_equivalent_to(shardings["out"]["kernel"], 2)
    )

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return updates, optax.apply_updates(params, updates), state

    updates, new_params, new_state = step(params, state)
    for tree in (updates, new_params):
        for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
            assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), leaf.sharding
    # Masks and moments keep the params' shardings (optax's scalar step count is replicated).
    for old, new in zip(jax.tree.leaves(state), jax.tree.leaves(new_state), strict=True):
        if new.ndim:
            assert new.sharding.is_equivalent_to(old.sharding, new.ndim), new.sharding
    assert float(_pruned_abs_sum(new_params, masks)) == 0.0


def test_nnx_state_params():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    kernel_mask = np.random.default_rng(0).random((8, 4)) < 0.5
    # The mask tree mirrors the nnx.State: None for the bias, a bool array for the kernel.
    masks = jax.tree_util.tree_map_with_path(
        lambda path, _: kernel_mask if "kernel" in jax.tree_util.keystr(path) else None, params
    )
    tx = fixed_mask(optax.adamw(1e-2, weight_decay=0.1), masks)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, updates)
    assert type(new) is type(params)
    kernel = np.asarray(new["kernel"][...])
    assert np.all(kernel[~kernel_mask] == 0.0)
    assert np.all(kernel[kernel_mask] != np.asarray(params["kernel"][...])[kernel_mask])


def test_deprecated_aliases():
    import jaxcompress.optim as jo

    params, masks, loss = _problem()
    with pytest.warns(DeprecationWarning, match="fixed_mask"):
        tx = jo.masked(optax.sgd(0.1), masks)
    state = tx.init(params)
    assert isinstance(state, jo.MaskedState) and jo.MaskedState is FixedMaskState
    ref = fixed_mask(optax.sgd(0.1), masks)
    grads = jax.grad(loss)(params)
    u, _ = tx.update(grads, state, params)
    r, _ = ref.update(grads, ref.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, u, r)


def test_update_with_a_tree_unlike_the_masks_names_the_first_differing_path():
    params, masks, loss = _problem()
    tx = fixed_mask(optax.sgd(0.1), masks)
    state = tx.init(params)
    grads = jax.grad(loss)(params)
    missing = {"dense": params["dense"]}  # no "out"
    with pytest.raises(ValueError, match=r"params: .*'out/kernel'.*present only in the masks"):
        tx.update(grads, state, missing)
    no_bias = {**grads, "dense": {"kernel": grads["dense"]["kernel"]}}
    with pytest.raises(
        ValueError, match=r"updates: .*'dense/kernel' where the masks have 'dense/bias'"
    ):
        tx.update(no_bias, state, params)
    extra = {**params, "z": {"kernel": jnp.ones((2, 2))}}
    with pytest.raises(ValueError, match=r"params: .*'z/kernel'.*present only in params"):
        tx.update(grads, state, extra)
    wrong_shape = {**grads, "out": {"kernel": jnp.ones((4, 8))}}
    with pytest.raises(ValueError, match=r"updates: leaf 'out/kernel' has shape \(4, 8\)"):
        tx.update(wrong_shape, state, params)
    with pytest.raises(ValueError, match=r"params: .*'out/kernel'"):
        jax.jit(tx.update)(grads, state, missing)
    with pytest.raises(TypeError, match="FixedMaskState"):
        tx.update(grads, optax.sgd(0.1).init(params), params)
