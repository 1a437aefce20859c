"""Argument checks shared by the transforms and schedules of :mod:`jaxcompress.optim`."""

from __future__ import annotations

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


def next_count(count: jax.Array) -> jax.Array:
    """``count + 1``, saturating at the dtype's maximum (``optax.safe_increment``)."""
    # optax annotates safe_increment as returning chex.Numeric; for an array it is an Array.
    return cast(jax.Array, optax.safe_increment(count))
