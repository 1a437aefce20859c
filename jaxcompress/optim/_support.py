"""Mask-tree primitives shared by the transforms that run an optimizer on a sparse support
(:func:`~jaxcompress.optim.fixed_mask`, :func:`~jaxcompress.optim.acdc`,
:func:`~jaxcompress.optim.gmp`).

A mask tree mirrors the params: a boolean array (``True`` = kept) on a pruned leaf, ``None``
on a leaf that is not pruned. One step on the support ``m`` runs the inner optimizer on the
masked gradients and params and replaces the pruned entries of its update by ``-params``:

    (u, s') = U(m * g, s, m * theta),    Delta = where(m, u, -theta),

so ``optax.apply_updates`` gives exactly 0 off the mask.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxcompress import masks as jc_masks
from jaxcompress._tree import is_none


def cancel_pruned_leaf(mask: Any, update: Any, param: Any) -> Any:
    """``where(mask, update, -param)``, so that ``param + update`` is exactly 0 off the mask."""
    if mask is None:
        return update
    # jnp.where promotes to result_type(update, param): an update narrower than its param
    # (e.g. bf16 updates for f32 params) is widened so that -param is represented exactly.
    return jnp.where(mask, update, -param)


def mask_leaf(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(mask, x, jnp.zeros((), dtype=x.dtype))


def place_like(mask: Any, param: Any) -> Any:
    """Returns ``mask`` as a bool array on ``param``'s sharding when that sharding is known."""
    if mask is None:
        return None
    mask = jnp.asarray(mask, dtype=bool)
    if (
        isinstance(param, jax.Array)
        and not isinstance(param, jax.core.Tracer)
        and not isinstance(mask, jax.core.Tracer)
        and not param.sharding.is_equivalent_to(mask.sharding, param.ndim)
    ):
        mask = jax.device_put(mask, param.sharding)
    return mask


def keep_where(masks: Any, active: jax.Array) -> Any:
    """Per leaf ``mask | ~active``: the mask while ``active``, all-kept otherwise."""
    return jax.tree.map(lambda m: None if m is None else m | ~active, masks, is_leaf=is_none)


def intersect(a: Any, b: Any) -> Any:
    """Leafwise ``a & b`` of two mask trees with the same ``None`` pattern."""
    return jax.tree.map(lambda x, y: None if x is None else x & y, a, b, is_leaf=is_none)


def hamming(a: Any, b: Any) -> jax.Array:
    """Number of entries where two mask trees differ (int32)."""
    counts = [
        jnp.sum(x != y, dtype=jnp.int32)
        for x, y in zip(
            jax.tree.leaves(a, is_leaf=is_none), jax.tree.leaves(b, is_leaf=is_none), strict=True
        )
        if x is not None
    ]
    return sum(counts, jnp.int32(0))


def full_masks(params: Any, template: Any) -> Any:
    """All-kept masks on the leaves where ``template`` (a mask tree or its shapes) is not None."""
    return jax.tree.map(
        lambda t, p: None if t is None else place_like(jnp.ones(p.shape, bool), p),
        template,
        params,
        is_leaf=is_none,
    )


def place_masks(masks: Any, params: Any) -> Any:
    """Masks on the params' shardings (when the params are concrete arrays)."""
    return jax.tree.map(place_like, masks, params, is_leaf=is_none)


def check_inner(inner: Any, fn: str) -> optax.GradientTransformationExtraArgs:
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(
            f"{fn}(): argument 'inner' must be an optax.GradientTransformation, got "
            f"{type(inner).__name__}: {inner!r}"
        )
    return optax.with_extra_args_support(inner)


def check_where(where: Any) -> None:
    if not callable(where):
        raise TypeError(f"where: expected a selector (path, leaf) -> bool, got {where!r}")


def masked_inner_update(
    inner: optax.GradientTransformationExtraArgs,
    updates: Any,
    inner_state: Any,
    params: Any,
    keep: Any,
    extra_args: dict,
) -> tuple[Any, Any]:
    """Runs ``inner`` on the support ``keep``: masked gradients and masked params."""
    grads = jc_masks.map_masked(mask_leaf, updates, keep)
    support = jc_masks.map_masked(mask_leaf, params, keep)
    return inner.update(grads, inner_state, support, **extra_args)


def cancel_pruned(keep: Any, inner_updates: Any, params: Any) -> Any:
    """``where(keep, u, -params)`` on masked leaves: pruned params become exactly 0."""
    return jax.tree.map(cancel_pruned_leaf, keep, inner_updates, params, is_leaf=is_none)
