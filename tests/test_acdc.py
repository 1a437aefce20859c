"""Tests for AC/DC (jaxcompress.optim._acdc) and its phase schedule (jaxcompress.optim._schedule).

Schedule rows are the timelines of algorithms.md 2.2; the training-loop parity test follows the
reference's loop (algorithms.md 2.1, 2.4) written independently in plain JAX.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _optim_loops import INNERS, acdc_steps, dense_out_params, make_step, run_steps
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcompress import masks as jc_masks
from jaxcompress.optim._acdc import AcdcState, acdc, moment_leaves
from jaxcompress.optim._schedule import (
    AcdcSchedule,
    acdc_schedule,
    acdc_schedule_from_epochs,
)

# ----------------------------------------------------------------------------- schedules


def _alternating(start, comp, decomp, cycles):
    out = []
    for k in range(cycles):
        c0 = start + k * (comp + decomp)
        out += [(c0, c0 + comp, "compressed"), (c0 + comp, c0 + comp + decomp, "decompressed")]
    return out


def _timeline(comp, decomp, cycles, tail):
    """Dense epochs 0-10, ``cycles`` pairs of ``comp`` compressed and ``decomp`` decompressed
    epochs from epoch 10, then the phases ``tail``."""
    return [(0, 10, "dense")] + _alternating(10, comp, decomp, cycles) + tail


def _imagenet(total):
    """The ImageNet timeline for ``total`` epochs: 5/5 cycles until 30 epochs before the end,
    C 5, D 10, then the final 15 epochs compressed."""
    t = total
    tail = [(t - 30, t - 25, "compressed"), (t - 25, t - 15, "decompressed")]
    return _timeline(5, 5, (t - 40) // 10, tail + [(t - 15, t, "compressed")])


# (prune triples, recycle triples, total epochs, expected timeline in epochs), algorithms.md 2.2.
REFERENCE_ROWS = {
    "imagenet_ep100": (
        [[10, 10, 71], [85, 20, 100]],
        [[15, 10, 66], [75, 20, 86]],
        100,
        _imagenet(100),
    ),
    "imagenet_ep150": (
        [[10, 10, 121], [135, 20, 150]],
        [[15, 10, 116], [125, 20, 134]],
        150,
        _imagenet(150),
    ),
    "cifar100_wrn_ep200": (
        [10, 40, 171],
        [30, 40, 161],
        200,
        _timeline(20, 20, 4, [(170, 200, "compressed")]),
    ),
    "cifar100_dense13_ep225": (
        [10, 33, 180],
        [30, 33, 170],
        225,
        _timeline(20, 13, 5, [(175, 225, "compressed")]),
    ),
    "cifar10_rn20_ep200": (
        [10, 40, 171],
        [30, 40, 151],
        200,
        _timeline(20, 20, 4, [(170, 200, "compressed")]),
    ),
}


def _range_union(triples):
    triples = triples if isinstance(triples[0], list) else [triples]
    return set().union(*(range(start, end, freq) for start, freq, end in triples))


def _reference_flags(prunes, recycles, steps_per_epoch, total_epochs):
    """Per-step flags of the reference Manager: epoch-begin events, pruning wins ties."""
    recycles = recycles - prunes
    compressed, c_start, d_start = [], [], []
    sparse = False
    for epoch in range(total_epochs):
        prune, recycle = epoch in prunes, epoch in recycles
        if prune:
            sparse = True
        elif recycle:
            sparse = False
        for i in range(steps_per_epoch):
            compressed.append(sparse)
            c_start.append(prune and i == 0)
            d_start.append(recycle and i == 0)
    return np.array(compressed), np.array(c_start), np.array(d_start)


@pytest.mark.parametrize("row", sorted(REFERENCE_ROWS))
@pytest.mark.parametrize("steps_per_epoch", [1, 7])
def test_schedule_reproduces_reference_timelines(row, steps_per_epoch):
    prune, recycle, total, expected = REFERENCE_ROWS[row]
    sched = acdc_schedule_from_epochs(
        prune, recycle, steps_per_epoch=steps_per_epoch, total_epochs=total
    )
    spe = steps_per_epoch
    assert sched.phases() == tuple((a * spe, b * spe, k) for a, b, k in expected)
    # Every step's predicates against a literal simulation of the reference event loop.
    comp, c_start, d_start = _reference_flags(
        _range_union(prune), _range_union(recycle), spe, total
    )
    steps = jnp.arange(total * spe + 3)  # a few steps past the end stay compressed
    np.testing.assert_array_equal(np.asarray(sched.is_compressed(steps))[: total * spe], comp)
    np.testing.assert_array_equal(
        np.asarray(sched.is_compressed_phase_start(steps))[: total * spe], c_start
    )
    np.testing.assert_array_equal(
        np.asarray(sched.is_decompressed_phase_start(steps))[: total * spe], d_start
    )
    assert np.all(np.asarray(sched.is_compressed(steps))[total * spe :])


def test_schedule_predicates_are_jittable_with_traced_step():
    sched = acdc_steps(3, 4, 2, 5, 24)
    traces = []

    @jax.jit
    def flags(t):
        traces.append(1)
        return (
            sched.is_compressed(t),
            sched.is_compressed_phase_start(t),
            sched.is_decompressed_phase_start(t),
        )

    got = np.array([[bool(v) for v in flags(jnp.int32(t))] for t in range(24)])
    assert len(traces) == 1
    # dense 0-3, C 3-7, D 7-9, C 9-13, D 13-19 (absorbs the remainder 16 mod 6), final C 19-24
    comp = [0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    np.testing.assert_array_equal(got[:, 0], np.array(comp, bool))
    assert [t for t in range(24) if got[t, 1]] == [3, 9, 19]
    assert [t for t in range(24) if got[t, 2]] == [7, 13]
    assert sched.num_cycles == 2
    assert sched.phases()[-2:] == ((13, 19, "decompressed"), (19, 24, "compressed"))
    assert [sched.phase_at(t) for t in (0, 3, 8, 23)] == [
        "dense",
        "compressed",
        "decompressed",
        "compressed",
    ]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(compressed_steps=0), "compressed_steps"),
        (dict(decompressed_steps=-2), "decompressed_steps"),
        (dict(final_compressed_steps=0), "final_compressed_steps"),
        (dict(final_compressed_steps=101), "final_compressed_steps"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(warmup_steps=80), "final_compressed_start"),  # no room for a full cycle
        (dict(total_steps=0), "total_steps"),
    ],
)
def test_schedule_rejects_bad_lengths(kwargs, match):
    base = dict(
        warmup_steps=10,
        compressed_steps=5,
        decompressed_steps=5,
        final_compressed_steps=15,
        total_steps=100,
    )
    with pytest.raises(ValueError, match=match):
        acdc_schedule(**{**base, **kwargs})


def test_schedule_rejects_bad_types_and_direct_construction():
    with pytest.raises(TypeError, match="compressed_steps"):
        acdc_steps(1, 2.0, 2, 2, 10)
    with pytest.raises(ValueError, match="final_compressed_start"):
        AcdcSchedule(
            warmup_steps=0,
            compressed_steps=2,
            decompressed_steps=2,
            final_compressed_start=10,
            total_steps=10,
        )


@pytest.mark.parametrize(
    "prune, recycle, total, match",
    [
        ([10, 40, 171], [30, 40, 151], 150, "total_epochs"),  # events past the end
        ([10, 40, 10], [30, 40, 151], 200, r"prune_triple.*end"),  # empty range
        ([10, 0, 171], [30, 40, 151], 200, r"prune_triple\[1\]"),  # freq 0
        ([10, 40], [30, 40, 151], 200, "prune_triple"),  # not a triple
        ([30, 40, 171], [10, 40, 151], 200, "alternating"),  # decompress before compress
        ([10, 40, 171], [30, 40, 191], 200, "alternating"),  # ends decompressed
        ([[10, 40, 171], [20, 100, 21]], [30, 40, 151], 200, "alternating"),  # two C in a row
        ([[10, 25, 36], [60, 1, 61]], [20, 20, 41], 100, "equal"),  # C phases of 10 and 5
    ],
)
def test_schedule_from_epochs_rejects_bad_triples(prune, recycle, total, match):
    with pytest.raises((ValueError, TypeError), match=match):
        acdc_schedule_from_epochs(prune, recycle, steps_per_epoch=2, total_epochs=total)


def test_schedule_from_epochs_prune_wins_ties():
    # Recycler also fires at 10, 50, ...: pruning wins, as in the reference Manager.
    with_ties = acdc_schedule_from_epochs(
        [10, 40, 171], [[30, 40, 151], [10, 40, 131]], steps_per_epoch=3, total_epochs=200
    )
    plain = acdc_schedule_from_epochs(
        [10, 40, 171], [30, 40, 151], steps_per_epoch=3, total_epochs=200
    )
    assert with_ties == plain


# ----------------------------------------------------------------------------- training


def _problem(seed=0):
    """Two dense layers (kernels pruned, bias free) on a least-squares problem."""
    rng = np.random.default_rng(seed)
    params = dense_out_params(rng)
    x = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)

    def loss(p):
        h = jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"])
        return jnp.mean((h @ p["out"]["kernel"] - y) ** 2)

    return params, loss


# dense 0-2, C 2-5, D 5-8, C 8-11, D 11-14, final C 14-18
SCHED = acdc_steps(2, 3, 3, 4, 18)


def _kernels(tree):
    return [tree["dense"]["kernel"], tree["out"]["kernel"]]


@pytest.mark.parametrize("name", sorted(INNERS))
def test_pruned_entries_exactly_zero_through_compressed_phases(name):
    params, loss = _problem()
    sparsity = 0.75
    tx = acdc(INNERS[name](), sparsity=sparsity, schedule=SCHED)
    history = run_steps(tx, params, loss, SCHED.total_steps + 2)
    n_kernel = 16 * 8 + 8 * 4
    kept_expected = int(np.ceil(n_kernel * (1 - sparsity)))
    for t in range(1, len(history)):
        p, state, _ = history[t]
        masks = _kernels(state.masks)
        assert int(state.count) == t
        # ``state.masks`` is in force at step t; params entering a compressed step are sparse.
        if bool(SCHED.is_compressed(t)):
            assert sum(int(m.sum()) for m in masks) == kept_expected
            for w, m in zip(_kernels(p), masks, strict=True):
                assert np.all(np.asarray(w)[~np.asarray(m)] == 0.0)
            assert bool(jnp.all(p["dense"]["bias"] != 0.0))  # never pruned
        # A compressed step also leaves the entering params of a decompressed phase sparse.
        if bool(SCHED.is_compressed(t - 1)) and not bool(SCHED.is_compressed(t)):
            prev_masks = _kernels(history[t - 1][1].masks)
            for w, m in zip(_kernels(p), prev_masks, strict=True):
                assert np.all(np.asarray(w)[~np.asarray(m)] == 0.0)
    # Decompressed phases free the weights: after the first D step (5) pruned entries move
    # (every entry of the output kernel has a non-zero gradient here).
    pruned_at_5 = ~np.asarray(history[5][1].masks["out"]["kernel"])
    assert np.all(np.asarray(history[5][0]["out"]["kernel"])[pruned_at_5] == 0.0)
    assert np.all(np.asarray(history[6][0]["out"]["kernel"])[pruned_at_5] != 0.0)


def masks_of(params):
    return jc_masks.magnitude(params, 0.0)  # all kept on the prunable leaves, None elsewhere


def _reference_acdc_sgd(params, loss, prunes, recycles, spe, epochs, lr, mom, sparsity):
    """The reference loop (IST-DASLab/ACDC), written out: epoch-begin prune/restore, masked
    gradients, torch SGD momentum, re-masking after the step, momentum reset on the first
    minibatch of a decompressed phase. Returns the params entering every step, then the final."""
    all_kept = jax.tree.map(lambda m: None if m is None else jnp.ones_like(m), masks_of(params))
    top_k = jax.jit(lambda p: jc_masks.magnitude(p, sparsity))  # order of (|w| + 1e-4) * 1

    @jax.jit
    def sgd_step(params, buf, masks):
        g = jc_masks.apply(jax.grad(loss)(params), masks)  # the grad hook
        buf = jax.tree.map(lambda b, gi: mom * b + gi, buf, g)
        params = jax.tree.map(lambda w, b: w - lr * b, params, buf)
        return jc_masks.apply(params, masks), buf  # apply_masks_to_data after step()

    masks, buf, out = all_kept, jax.tree.map(jnp.zeros_like, params), []
    for epoch in range(epochs):
        reset = False
        if epoch in prunes:
            masks = top_k(params)
            params = jc_masks.apply(params, masks)
        elif epoch in recycles:
            masks, reset = all_kept, True
        for _ in range(spe):
            out.append(params)
            if reset:
                buf, reset = jax.tree.map(jnp.zeros_like, buf), False
            params, buf = sgd_step(params, buf, masks)
    return out + [params]


def test_parity_with_reference_loop_sgd_momentum():
    params, loss = _problem(seed=3)
    prune, recycle, spe, epochs = [1, 3, 8], [2, 3, 7], 3, 9  # C 1-2, D 2-4, C 4-5, D 5-7, C 7-9
    sched = acdc_schedule_from_epochs(prune, recycle, steps_per_epoch=spe, total_epochs=epochs)
    lr, mom, sparsity = 0.05, 0.9, 0.6
    tx = acdc(optax.sgd(lr, momentum=mom), sparsity=sparsity, schedule=sched)
    ours = [p for p, _, _ in run_steps(tx, params, loss, spe * epochs)]  # entering each step
    ref = _reference_acdc_sgd(
        params, loss, set(range(1, 8, 3)), set(range(2, 7, 3)), spe, epochs, lr, mom, sparsity
    )
    for t, (a, b) in enumerate(zip(ours, ref, strict=True)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6, err_msg=f"step {t}")
            np.testing.assert_array_equal(np.asarray(x) == 0, np.asarray(y) == 0)


def test_masks_change_only_at_compressed_phase_starts_and_hamming_is_logged():
    params, loss = _problem(seed=1)
    tx = acdc(optax.sgd(0.2, momentum=0.9), sparsity=0.5, schedule=SCHED)
    history = run_steps(tx, params, loss, SCHED.total_steps)
    starts = [t for t in range(len(history)) if bool(SCHED.is_compressed_phase_start(t))]
    assert starts == [2, 8, 14]
    diffs = {}
    for t in range(1, len(history)):
        prev, cur = history[t - 1][1], history[t][1]
        diffs[t] = sum(
            int(jnp.sum(a != b))
            for a, b in zip(_kernels(prev.masks), _kernels(cur.masks), strict=True)
        )
        if t in starts:
            assert int(cur.mask_hamming) == diffs[t]
            # The new mask is the magnitude mask of the params entering step t.
            expected = jc_masks.magnitude(history[t][0], 0.5)
            for a, b in zip(_kernels(expected), _kernels(cur.masks), strict=True):
                np.testing.assert_array_equal(a, b)
        else:
            assert diffs[t] == 0
            assert int(cur.mask_hamming) == int(prev.mask_hamming)
    assert diffs[2] == (16 * 8 + 8 * 4) // 2  # the first mask is compared with all-kept
    assert diffs[8] > 0  # the decompressed phase moved the support


def test_one_compilation_for_the_whole_schedule():
    params, loss = _problem()
    traces = []
    tx = acdc(optax.adamw(0.01), sparsity=0.5, schedule=SCHED)
    history = run_steps(tx, params, loss, SCHED.total_steps + 3, traces=traces)
    assert len(traces) == 1
    assert isinstance(history[-1][1], AcdcState)


def _state_after(tx, params, loss, num_steps):
    history = run_steps(tx, params, loss, num_steps)
    return history[-2][1], history[-1][1], history[-1][2]  # state before, after, grads


def test_momentum_trace_reset_at_decompression_only():
    params, loss = _problem()
    mom = 0.9
    tx = acdc(optax.sgd(0.05, momentum=mom), sparsity=0.5, schedule=SCHED)
    history = run_steps(tx, params, loss, 9)
    for t in range(1, 9):
        before, after, grads = history[t - 1][1], history[t][1], history[t][2]
        trace = after.inner_state[0].trace
        old = before.inner_state[0].trace
        keep = history[t - 1][1].masks  # mask in force at step t - 1
        dense = not bool(SCHED.is_compressed(t - 1))
        g = jc_masks.map_masked(lambda x, m, d=dense: jnp.where(m | d, x, 0.0), grads, keep)
        if t - 1 == 5:  # first step of a decompressed phase: trace restarts from 0
            expected = g
        else:
            expected = jax.tree.map(lambda gi, o: gi + mom * o, g, old)
        for a, b in zip(jax.tree.leaves(trace), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=f"step {t - 1}")
    # Compressed-phase start (step 2) keeps the momentum of freshly pruned weights (it decays).
    pruned = ~np.asarray(history[3][1].masks["dense"]["kernel"])
    trace_after_2 = np.asarray(history[3][1].inner_state[0].trace["dense"]["kernel"])
    trace_after_1 = np.asarray(history[2][1].inner_state[0].trace["dense"]["kernel"])
    np.testing.assert_allclose(trace_after_2[pruned], mom * trace_after_1[pruned], rtol=1e-6)
    assert np.all(trace_after_2[pruned] != 0.0)


@pytest.mark.parametrize("mode", [True, "all", "none"])
def test_adam_moments_reset_and_count(mode):
    params, loss = _problem()
    b1, b2 = 0.9, 0.999
    tx = acdc(optax.adam(0.01, b1=b1, b2=b2), sparsity=0.5, schedule=SCHED, reset_inner_state=mode)
    before, after, grads = _state_after(tx, params, loss, 6)  # the update of step 5 (D start)
    adam_before, adam = before.inner_state[0], after.inner_state[0]
    if mode == "none":
        expected_mu = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m, grads, adam_before.mu)
        expected_count = 6
    else:
        expected_mu = jax.tree.map(lambda g: (1 - b1) * g, grads)
        expected_count = 1 if mode == "all" else 6
    for a, b in zip(jax.tree.leaves(adam.mu), jax.tree.leaves(expected_mu), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
    if mode != "none":
        for a, g in zip(jax.tree.leaves(adam.nu), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(a, (1 - b2) * g * g, rtol=1e-5, atol=1e-10)
    assert int(adam.count) == expected_count


def test_reset_keeps_schedule_counters_and_injected_hyperparams():
    params, loss = _problem()
    lr = optax.linear_schedule(0.1, 0.01, 18)
    inner = optax.chain(
        optax.clip_by_global_norm(1e6),
        optax.inject_hyperparams(optax.sgd)(learning_rate=lr, momentum=0.9),
    )
    tx = acdc(inner, sparsity=0.5, schedule=SCHED)
    _, after, grads = _state_after(tx, params, loss, 6)
    injected = after.inner_state[1]
    assert int(injected.count) == 6  # the schedule keeps running through the reset
    np.testing.assert_allclose(injected.hyperparams["learning_rate"], lr(5), rtol=1e-6)
    np.testing.assert_allclose(injected.hyperparams["momentum"], 0.9)
    trace = injected.inner_state[0].trace
    for a, b in zip(jax.tree.leaves(trace), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
    # The default selector: floats outside ``hyperparams``, never integers.
    paths = jax.tree_util.tree_flatten_with_path(after.inner_state)[0]
    chosen = {jax.tree_util.keystr(p) for p, leaf in paths if moment_leaves(p, leaf)}
    assert chosen and all("trace" in p for p in chosen)


def test_callable_reset_selector():
    params, loss = _problem()
    only_dense = lambda path, leaf: "dense" in jax.tree_util.keystr(path)  # noqa: E731
    tx = acdc(
        optax.sgd(0.05, momentum=0.9),
        sparsity=0.5,
        schedule=SCHED,
        reset_inner_state=only_dense,
    )
    before, after, grads = _state_after(tx, params, loss, 6)
    trace, old = after.inner_state[0].trace, before.inner_state[0].trace
    np.testing.assert_allclose(trace["dense"]["kernel"], grads["dense"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(
        trace["out"]["kernel"], grads["out"]["kernel"] + 0.9 * old["out"]["kernel"], rtol=1e-6
    )


def test_layer_and_nm_scopes():
    params, loss = _problem()
    layer = acdc(optax.sgd(0.05), sparsity=0.75, schedule=SCHED, scope="layer")
    state = run_steps(layer, params, loss, 3)[-1][1]  # masks for step 3 (compressed)
    assert [int(m.sum()) for m in _kernels(state.masks)] == [32, 8]
    nm = acdc(optax.sgd(0.05), sparsity=None, schedule=SCHED, scope="nm", nm=(2, 4))
    history = run_steps(nm, params, loss, 4)
    for m, w in zip(_kernels(history[-1][1].masks), _kernels(history[-1][0]), strict=True):
        groups = np.asarray(m).reshape(-1, 4, m.shape[-1])  # groups of 4 along axis -2
        assert np.all(groups.sum(axis=1) == 2)
        assert np.all(np.asarray(w)[~np.asarray(m)] == 0.0)


def test_warmup_zero_computes_the_first_mask_in_init():
    params, loss = _problem()
    sched = acdc_steps(0, 2, 2, 2, 6)
    tx = acdc(optax.sgd(0.05), sparsity=0.5, schedule=sched)
    history = run_steps(tx, params, loss, 1)
    init_masks = history[0][1].masks
    for a, b in zip(_kernels(init_masks), _kernels(jc_masks.magnitude(params, 0.5)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(history[0][1].mask_hamming) == 80
    for w, m in zip(_kernels(history[1][0]), _kernels(init_masks), strict=True):
        assert np.all(np.asarray(w)[~np.asarray(m)] == 0.0)


def test_flax_nnx_state_params():
    from flax import nnx

    from jaxcompress.models import MLP

    model = MLP(12, (8,), 4, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 12)), jnp.float32)

    def loss(p):
        graphdef, rest = nnx.split(model, nnx.Param, ...)[0::2]
        return jnp.mean(nnx.merge(graphdef, p, rest)(x) ** 2)

    tx = acdc(optax.sgd(0.1, momentum=0.9), sparsity=0.5, schedule=SCHED)
    p, state, _ = run_steps(tx, params, loss, 3)[-1]  # step 2 is compressed
    chosen = {
        jc_masks.path_str(path): m
        for path, m in jax.tree_util.tree_flatten_with_path(
            state.masks, is_leaf=lambda v: v is None
        )[0]
        if m is not None
    }
    assert chosen and all(name.endswith("kernel") for name in chosen)
    assert sum(int(m.sum()) for m in chosen.values()) == (12 * 8 + 8 * 4) // 2
    flat_p = {jc_masks.path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(p)[0]}
    for name, m in chosen.items():
        assert np.all(np.asarray(flat_p[name])[~np.asarray(m)] == 0.0)


def test_sharded_params_keep_their_shardings():
    devices = np.array(jax.devices()[:8])
    if devices.size < 8:
        pytest.skip("needs 8 devices (tests/conftest.py emulates them on CPU)")
    mesh = Mesh(devices, ("x",))
    params, loss = _problem()
    specs = {"dense": {"kernel": P("x", None), "bias": P()}, "out": {"kernel": P("x", None)}}
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    params = jax.device_put(params, shardings)
    tx = acdc(optax.sgd(0.05, momentum=0.9), sparsity=0.5, schedule=SCHED)
    history = run_steps(tx, params, loss, 4)  # through the first mask computation
    p, state, _ = history[-1]
    # AC/DC adds no resharding: the same output shardings as the inner optimizer alone (XLA
    # may choose to shard the replicated bias's output either way).
    base_p, base_state, _ = run_steps(optax.sgd(0.05, momentum=0.9), params, loss, 4)[-1]
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(base_p), strict=True):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
    for a, b in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(base_state), strict=True):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
    for m, w, sharding in zip(_kernels(state.masks), _kernels(p), _kernels(shardings), strict=True):
        assert w.sharding.is_equivalent_to(sharding, w.ndim)  # kernels stay row-sharded
        assert m.sharding.is_equivalent_to(w.sharding, w.ndim)


def test_resume_from_checkpoint_mid_phase_matches_uninterrupted_run(tmp_path):
    checkpoint = pytest.importorskip("jaxcompress.checkpoint")
    params, loss = _problem()
    tx = acdc(optax.adamw(0.01), sparsity=0.5, schedule=SCHED)
    step = make_step(tx, loss)
    full_params, full_state = params, tx.init(params)
    for _ in range(SCHED.total_steps):
        full_params, full_state, _ = step(full_params, full_state)

    p, s = params, tx.init(params)
    for _ in range(9):  # step 9 is the middle of the compressed phase 8-11
        p, s, _ = step(p, s)
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(9, params=p, opt_state=s)
        target = jax.eval_shape(lambda: {"params": p, "opt_state": s})
        restored = ckpt.restore(target=target)
    p, s = restored["params"], restored["opt_state"]
    assert isinstance(s, AcdcState) and int(s.count) == 9
    for _ in range(9, SCHED.total_steps):
        p, s, _ = step(p, s)
    for a, b in zip(
        jax.tree.leaves((p, s)), jax.tree.leaves((full_params, full_state)), strict=True
    ):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- errors


def test_factory_rejects_bad_arguments():
    ok = dict(sparsity=0.5, schedule=SCHED)
    with pytest.raises(TypeError, match="inner"):
        acdc(lambda g: g, **ok)
    with pytest.raises(TypeError, match="schedule"):
        acdc(optax.sgd(0.1), sparsity=0.5, schedule=(2, 3, 3, 14, 18))
    with pytest.raises(ValueError, match="scope"):
        acdc(optax.sgd(0.1), scope="block", **ok)
    with pytest.raises(ValueError, match="sparsity"):
        acdc(optax.sgd(0.1), sparsity=1.0, schedule=SCHED)
    with pytest.raises(ValueError, match="sparsity"):
        acdc(optax.sgd(0.1), sparsity=None, schedule=SCHED)
    with pytest.raises(ValueError, match="scope='layer'"):
        acdc(optax.sgd(0.1), sparsity={"dense": {"kernel": 0.5}}, schedule=SCHED)
    with pytest.raises(ValueError, match="1 - n/m"):
        acdc(optax.sgd(0.1), sparsity=0.9, schedule=SCHED, scope="nm")
    with pytest.raises(ValueError, match="nm"):
        acdc(optax.sgd(0.1), sparsity=None, schedule=SCHED, scope="nm", nm=(4, 4))
    with pytest.raises(ValueError, match=r"nm: n must satisfy 1 <= n < m.*n=0"):
        acdc(optax.sgd(0.1), sparsity=None, schedule=SCHED, scope="nm", nm=(0, 4))
    with pytest.raises(TypeError, match="nm: expected a pair"):
        acdc(optax.sgd(0.1), sparsity=None, schedule=SCHED, scope="nm", nm=(2, 4, 8))
    with pytest.raises(TypeError, match="nm: m must be an int"):
        acdc(optax.sgd(0.1), sparsity=None, schedule=SCHED, scope="nm", nm=(2, 4.0))
    with pytest.raises(ValueError, match="reset_inner_state"):
        acdc(optax.sgd(0.1), reset_inner_state="momentum", **ok)
    with pytest.raises(TypeError, match="where"):
        acdc(optax.sgd(0.1), where="kernel", **ok)


def test_update_without_params_and_bad_params_raise():
    params, _ = _problem()
    tx = acdc(optax.sgd(0.1), sparsity=0.5, schedule=SCHED)
    state = tx.init(params)
    with pytest.raises(ValueError, match="params"):
        tx.update(params, state)
    nm = acdc(optax.sgd(0.1), sparsity=None, schedule=SCHED, scope="nm", nm=(2, 3))
    with pytest.raises(ValueError, match="divisible by m=3"):
        nm.init(params)
