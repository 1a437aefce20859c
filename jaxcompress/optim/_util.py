"""What the transforms of :mod:`jaxcompress.optim` share around ``update``: the state and params
checks, a transformation built from a step that needs the params, the saturating counter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import jax
import optax

_State = TypeVar("_State")


def check_update_args(
    fn: str, state: Any, state_type: type[_State], params: Any, why: str
) -> tuple[_State, optax.Params]:
    """Return ``(state, params)``; raise unless ``state`` is a ``state_type`` (from ``init``)
    and ``params`` is given.

    ``fn`` names the transform (``"acdc()"``), ``why`` says what the params are needed for.
    """
    if not isinstance(state, state_type):
        raise TypeError(
            f"{fn}: state must be the {state_type.__name__} returned by init, got "
            f"{type(state).__name__}"
        )
    if params is None:
        raise ValueError(
            f"{fn}: update() needs the current params ({why}); call "
            "tx.update(grads, opt_state, params)."
        )
    return state, params


def transform_needing_params(
    init_fn: optax.TransformInitFn,
    fn: str,
    state_type: type,
    why: str,
    step: Callable[[optax.Updates, Any, optax.Params, dict], tuple[optax.Updates, optax.OptState]],
) -> optax.GradientTransformationExtraArgs:
    """An optax transformation whose ``update(updates, state, params=None, **extra_args)``
    checks ``state`` and ``params`` (:func:`check_update_args` with ``fn``, ``state_type``,
    ``why``) and returns ``step(updates, state, params, extra_args)``."""

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        checked, params = check_update_args(fn, state, state_type, params, why)
        return step(updates, checked, params, extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def next_count(count: jax.Array) -> jax.Array:
    """``count + 1``, saturating at the dtype's maximum (``optax.safe_increment``)."""
    # optax annotates safe_increment as returning chex.Numeric; for an array it is an Array.
    return cast(jax.Array, optax.safe_increment(count))
