"""The contract every optax transform of the library keeps (after optax's own test suites).

Each case below runs the same checks:

* ``init``/``update``: updates have the params' paths, shapes and dtypes; the state after an
  update has the paths, shapes, dtypes and weak types of the state before it (what
  ``lax.cond``/``lax.scan`` and the optax wrappers need); ``init`` works on abstract params.
* a jitted ``update`` is traced and compiled once, however many steps it runs;
* ``optax.inject_hyperparams``: the injected transform equals the plain one, and changing
  the injected value in the state changes the step without retracing (transforms without an
  array hyperparameter run with an injected inner optimizer instead);
* ``optax.MultiSteps``: ``k - 1`` zero updates, then the update of the mean gradient;
* ``optax.apply_if_finite``: a non-finite gradient leaves the inner state untouched;
* sharded params over the 8 emulated devices: state leaves that mirror a param keep its
  sharding through ``init`` and a jitted ``update``, and nothing recompiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _optim_loops import acdc_steps
from _util import (
    assert_trees_allclose,
    assert_trees_equal,
    count_compiles,
    jit_counting,
    same_structure,
    shard_rows,
)
from flax import nnx

import jaxcompress.latency as L
import jaxcompress.masks as jm
from jaxcompress import optim
from jaxcompress import structure as S
from jaxcompress.masks import path_str

# ----------------------------------------------------------------------------- problems


def _kernel_params() -> dict:
    rng = np.random.default_rng(0)
    return {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(8,)), jnp.float32),
        },
        "out": {"kernel": jnp.asarray(rng.normal(size=(8, 8)), jnp.bfloat16)},
    }


def _gate_params() -> dict:
    """Two ``structure.Gate`` leaves (groups ``x`` and ``y``, named by their last key) beside an
    ordinary ``nnx.Param`` kernel, as in the params of a ``jc.latency.gated`` model."""
    rng = np.random.default_rng(1)
    return {
        "x": S.Gate(jnp.asarray(rng.uniform(0.1, 1.0, size=(8,)), jnp.float32)),
        "y": S.Gate(jnp.asarray(rng.uniform(0.1, 1.0, size=(8,)), jnp.float32)),
        "dense": {"kernel": nnx.Param(jnp.asarray(rng.normal(size=(8, 8)), jnp.float32))},
    }


def _loss(params: Any) -> jax.Array:
    """A quadratic with a different target per leaf, computed in float32."""
    total = jnp.zeros((), jnp.float32)
    for i, leaf in enumerate(jax.tree.leaves(params)):
        target = jnp.sin(jnp.arange(leaf.size, dtype=jnp.float32) + i).reshape(leaf.shape)
        total = total + 0.5 * jnp.sum((leaf.astype(jnp.float32) - target) ** 2)
    return total


_grad = jax.grad(_loss)


def _grads(params: Any, step: int = 0) -> Any:
    return jax.tree.map(lambda g: (g * (1.0 + 0.25 * step)).astype(g.dtype), _grad(params))


# ----------------------------------------------------------------------------- cases


def _sgd():
    return optax.sgd(0.1, momentum=0.9)


def _injected_sgd():
    return optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)


def _set_top(name: str) -> Callable[[Any, float], Any]:
    """Set an ``inject_hyperparams`` value on the outer state."""

    def setter(state, value):
        old = state.hyperparams[name]
        return state._replace(
            hyperparams={**state.hyperparams, name: jnp.asarray(value, old.dtype)}
        )

    return setter


def _set_inner_lr(state, value):
    """Set the learning rate of an injected inner optimizer (``state.inner_state``)."""
    inner = state.inner_state
    old = inner.hyperparams["learning_rate"]
    hyper = {**inner.hyperparams, "learning_rate": jnp.asarray(value, old.dtype)}
    return state._replace(inner_state=inner._replace(hyperparams=hyper))


ACDC_SCHEDULE = acdc_steps(1, 2, 1, 2, 8)  # an immutable AcdcSchedule


@dataclasses.dataclass(frozen=True)
class Case:
    """One transform under contract.

    ``make()`` builds it; ``injected()`` builds it with a hyperparameter injected (top level,
    or in the inner optimizer), ``set_hyper(state, value)`` changes that value in the state and
    ``new_value`` is the value to change to; ``mirrors_params``: some state leaves have a
    param's shape (masks, moments) and must carry its sharding.
    """

    make: Callable[[], optax.GradientTransformation]
    injected: Callable[[], optax.GradientTransformation]
    set_hyper: Callable[[Any, float], Any]
    new_value: float
    params: Callable[[], Any] = _kernel_params
    grad_fn: bool = False
    mirrors_params: bool = True


def _masks():
    return jm.magnitude(_kernel_params(), 0.5)


def _macs():
    """MACs ``2 x y`` of two groups of 8 units."""
    return S.MacCount({("x", "y"): 2}, {"x": 8, "y": 8})


CASES = {
    "fixed_mask": Case(
        make=lambda: optim.fixed_mask(_sgd(), _masks()),
        injected=lambda: optim.fixed_mask(_injected_sgd(), _masks()),
        set_hyper=_set_inner_lr,
        new_value=0.02,
    ),
    "cram": Case(
        make=lambda: optim.cram(_sgd(), rho=0.05, sparsities=(0.5, 0.7)),
        injected=lambda: optax.inject_hyperparams(optim.cram)(
            _sgd(), rho=0.05, sparsities=(0.5, 0.7)
        ),
        set_hyper=_set_top("rho"),
        new_value=0.5,
        grad_fn=True,
    ),
    "cram_nm": Case(
        make=lambda: optim.cram(_sgd(), rho=0.05, compressor="nm", nm_patterns=((2, 4), (4, 8))),
        injected=lambda: optax.inject_hyperparams(optim.cram)(
            _sgd(), rho=0.05, compressor="nm", nm_patterns=((2, 4), (4, 8))
        ),
        set_hyper=_set_top("rho"),
        new_value=0.5,
        grad_fn=True,
    ),
    "acdc": Case(
        make=lambda: optim.acdc(_sgd(), sparsity=0.5, schedule=ACDC_SCHEDULE),
        injected=lambda: optax.inject_hyperparams(
            optim.acdc, static_args=("where", "reset_inner_state", "reference_ties")
        )(_sgd(), sparsity=0.5, schedule=ACDC_SCHEDULE),
        set_hyper=_set_top("sparsity"),
        new_value=0.8,
    ),
    "gmp": Case(
        make=lambda: optim.gmp(_sgd(), sparsity=0.75, begin_step=0, end_step=4, every=1),
        injected=lambda: optim.gmp(
            _injected_sgd(), sparsity=0.75, begin_step=0, end_step=4, every=1
        ),
        set_hyper=_set_inner_lr,
        new_value=0.02,
    ),
    "surrogate_penalty": Case(
        make=lambda: L.surrogate_penalty(_macs(), 0.5),
        injected=lambda: optax.inject_hyperparams(
            L.surrogate_penalty,
            static_args=("cost", "kind", "p", "eps", "feedback", "tau", "multiple", "scale"),
        )(_macs(), 0.5),
        set_hyper=_set_top("strength"),
        new_value=2.0,
        params=_gate_params,
        mirrors_params=False,
    ),
    "project_nonnegative": Case(
        make=lambda: L.project_nonnegative(prune_below=0.3),
        injected=lambda: optax.inject_hyperparams(L.project_nonnegative)(prune_below=0.3),
        set_hyper=_set_top("prune_below"),
        new_value=0.9,
        params=_gate_params,
        mirrors_params=False,
    ),
}


def _update(case: Case, tx, grads, state, params):
    if case.grad_fn:
        return tx.update(grads, state, params, grad_fn=_grad)
    return tx.update(grads, state, params)


def _train_step(case: Case, tx):
    """A trace-counting jitted ``(params, state, grads) -> (params, state)`` step."""

    @jit_counting
    def step(params, state, grads):
        updates, state = _update(case, tx, grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _update_step(case: Case, tx, params):
    """A trace-counting jitted ``(state, grads) -> (updates, state)`` at fixed ``params``."""
    return jit_counting(lambda state, grads: _update(case, tx, grads, state, params))


def _avals(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: (tuple(x.shape), jnp.dtype(x.dtype), jax.typeof(x).weak_type), tree
    )


parametrize = pytest.mark.parametrize("name", sorted(CASES))


# ----------------------------------------------------------------------------- contract


@parametrize
def test_init_and_update_keep_paths_shapes_and_dtypes(name):
    case = CASES[name]
    tx, params = case.make(), case.params()
    state = tx.init(params)
    abstract = jax.eval_shape(
        tx.init, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    )
    same_structure(abstract, state)
    updates, new_state = _update(case, tx, _grads(params), state, params)
    same_structure(updates, params)
    assert _avals(new_state) == _avals(state)
    new_params = optax.apply_updates(params, updates)
    same_structure(new_params, params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new_params))


@parametrize
def test_jitted_update_traces_and_compiles_once(name):
    case = CASES[name]
    tx, params = case.make(), case.params()

    step = _train_step(case, tx)

    state = tx.init(params)
    params, state = step(params, state, _grads(params, 0))
    with count_compiles() as counter:
        for i in range(1, 4):
            params, state = step(params, state, _grads(params, i))
    assert step.traces == 1
    assert counter.compiles == 0


@parametrize
def test_inject_hyperparams(name):
    case = CASES[name]
    # float32 params: optax's own inject_hyperparams(sgd) turns a bf16 momentum trace into
    # float32 on the first step (float32 hyperparameter times bf16), which would retrace.
    params = jax.tree.map(lambda x: x.astype(jnp.float32), case.params())
    plain, injected = case.make(), case.injected()
    grads = _grads(params)

    @jit_counting
    def step(state):
        return _update(case, injected, grads, state, params)

    state0 = injected.init(params)
    u_inj, s_inj = step(state0)
    u_ref, s_ref = _update(case, plain, grads, plain.init(params), params)
    assert_trees_allclose(u_inj, u_ref, rtol=1e-6, atol=1e-7)
    # the same state with another value: a different step, and no retrace
    changed = case.set_hyper(s_inj, case.new_value)
    kept = step(s_inj)
    moved = step(changed)
    assert step.traces == 1
    differs = [
        not np.allclose(np.asarray(a, np.float32), np.asarray(b, np.float32))
        for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(moved), strict=True)
    ]
    assert any(differs), f"{name}: changing the injected hyperparameter changed nothing"


@pytest.mark.parametrize(
    "make",
    [
        lambda v: L.surrogate_penalty(_macs(), v),
        lambda v: L.project_nonnegative(prune_below=v),
    ],
    ids=["surrogate_penalty", "project_nonnegative"],
)
def test_array_hyperparameters_are_checked_by_shape_and_dtype(make):
    """An injectable hyperparameter may be a (traced) array: a 0-d float passes, other
    shapes and dtypes fail at once; a Python number is still checked by value."""
    make(jnp.asarray(0.5, jnp.float32))
    for bad in (jnp.zeros((2,), jnp.float32), jnp.asarray(True), -0.5):
        with pytest.raises(ValueError):
            make(bad)


def _wrapped(name: str, wrap: Callable[[optax.GradientTransformation], Any]):
    """Case ``name``'s transform wrapped by ``wrap``, on the case's params and gradients:
    ``(params, grads, step, state, ref)``, ``step`` a trace-counting jitted
    ``(state, grads) -> (updates, state)`` of the wrapped transform, ``state`` its ``init`` and
    ``ref`` the plain transform's first update of ``grads``."""
    case = CASES[name]
    tx, params = case.make(), case.params()
    wrapped = wrap(tx)
    grads = _grads(params)
    ref, _ = _update(case, tx, grads, tx.init(params), params)
    return params, grads, _update_step(case, wrapped, params), wrapped.init(params), ref


@parametrize
def test_multisteps_accumulates_then_applies_the_mean(name):
    params, grads, micro, state, ref = _wrapped(
        name, lambda tx: optax.MultiSteps(tx, every_k_schedule=2)
    )
    u1, state = micro(state, grads)
    u2, state = micro(state, grads)
    assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(u1))
    assert_trees_allclose(u2, ref, rtol=1e-5, atol=1e-6)
    u3, state = micro(state, _grads(params, 1))
    assert micro.traces == 1


@parametrize
def test_apply_if_finite_skips_non_finite_gradients(name):
    _, grads, step, state0, ref = _wrapped(
        name, lambda tx: optax.apply_if_finite(tx, max_consecutive_errors=3)
    )
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
    u_bad, state1 = step(state0, bad)
    assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(u_bad))
    assert_trees_equal(state1.inner_state, state0.inner_state)
    assert int(state1.notfinite_count) == 1
    u_ok, state2 = step(state1, grads)
    assert_trees_allclose(u_ok, ref, rtol=1e-6, atol=1e-7)
    assert int(state2.notfinite_count) == 0 and step.traces == 1


def _mirrored(state: Any, params: Any) -> list[tuple[str, jax.Array, jax.Array]]:
    """``(state path, state leaf, param)`` for every state leaf whose path ends with a param's
    path and whose shape is the param's."""
    by_path = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    out = []
    for p, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        spath = path_str(p)
        for ppath, param in by_path.items():
            if (spath == ppath or spath.endswith("/" + ppath)) and leaf.shape == param.shape:
                out.append((spath, leaf, param))
    return out


def _check_shardings(state: Any, params: Any, expect: bool) -> None:
    pairs = _mirrored(state, params)
    assert bool(pairs) == expect, [p for p, _, _ in pairs]
    for spath, leaf, param in pairs:
        assert leaf.sharding.is_equivalent_to(param.sharding, param.ndim), (
            f"{spath}: {leaf.sharding} is not the param's {param.sharding}"
        )


@parametrize
def test_sharded_state_follows_the_params(name):
    case = CASES[name]
    tx = case.make()
    params = shard_rows(case.params())
    assert params["dense"]["kernel"].sharding.spec[0] == "d"
    state = tx.init(params)
    _check_shardings(state, params, case.mirrors_params)

    step = _train_step(case, tx)

    params, state = step(params, state, shard_rows(_grads(params)))
    _check_shardings(state, params, case.mirrors_params)
    for (path, p), q in zip(
        jax.tree_util.tree_flatten_with_path(params)[0],
        jax.tree.leaves(shard_rows(case.params())),
        strict=True,
    ):
        assert p.sharding.is_equivalent_to(q.sharding, p.ndim), path_str(path)
    # from the second step on the state is the jitted update's own output
    params, state = step(params, state, shard_rows(_grads(params, 1)))
    traces = step.traces
    with count_compiles() as counter:
        params, state = step(params, state, shard_rows(_grads(params, 2)))
    assert step.traces == traces and counter.compiles == 0


@parametrize
def test_sharded_second_step_does_not_recompile(name):
    """The state from an eager ``init`` on sharded params is placed as the jitted update
    returns it, so the second step reuses the first step's program."""
    case = CASES[name]
    tx = case.make()
    params = shard_rows(case.params())

    step = _train_step(case, tx)

    state = tx.init(params)
    params, state = step(params, state, shard_rows(_grads(params)))
    with count_compiles() as counter:
        params, state = step(params, state, shard_rows(_grads(params, 1)))
    assert step.traces == 1 and counter.compiles == 0


@parametrize
def test_init_under_jit_on_sharded_params(name):
    """``init`` traced by ``jit`` (where the params are tracers, with no placement to read)
    gives the eager state's values."""
    case = CASES[name]
    tx = case.make()
    params = shard_rows(case.params())
    assert_trees_equal(jax.jit(tx.init)(params), tx.init(params))


@parametrize
def test_single_device_init_is_unchanged(name):
    """Without sharded params ``init`` commits nothing: the state stays where JAX puts it."""
    case = CASES[name]
    state = case.make().init(case.params())
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        assert len(leaf.sharding.device_set) == 1, path_str(path)
        if leaf.ndim == 0:
            assert not leaf.committed, path_str(path)
