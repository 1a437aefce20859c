"""N:M semi-structured masks (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks").

In every group of ``m`` consecutive entries along the contracting axis keep the ``n`` with
the largest ``|w|``. The contracting axis is axis ``-2``: the ``in`` axis of a Flax Dense
kernel ``(in, out)`` and of a Conv kernel ``(kh, kw, in, out)``. This is the grouping of
the reference ``NMTopkCrAM`` / ``MagnitudeNMPruner`` (algorithms.md 1.2 step 4) once torch's
``(out, in, ...)`` layout is mapped to Flax's, and the one sparse tensor cores consume.

Ties: inside a group, entries are ranked by ``|w|`` descending then by position along the
axis ascending, so among equal magnitudes the lower ``in`` index is kept; every group keeps
exactly ``n``. Magnitudes are compared as float32 bit patterns (NaN ranks above inf).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress.masks._magnitude import magnitude_keys
from jaxcompress.masks._selection import Selector, check_selected_floating, path_str, prunable

#: Largest ``m`` ranked by pairwise comparison (``m * m`` work per group); larger ``m`` sorts.
_PAIRWISE_MAX_M = 32


def _check_nm(n: Any, m: Any) -> None:
    for name, value in (("n", n), ("m", m)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if m <= 0:
        raise ValueError(f"m: expected a positive group size, got {m}")
    if n < 0 or n >= m:
        raise ValueError(f"n: expected 0 <= n < m (= {m}), got {n}")


def _group_ranks(keys: jax.Array) -> jax.Array:
    """Rank of every entry in its group (last axis): 0 = largest key, ties by position."""
    m = keys.shape[-1]
    if m <= _PAIRWISE_MAX_M:
        a = keys[..., :, None]  # entry i
        b = keys[..., None, :]  # entry j
        pos = jnp.arange(m)
        earlier = pos[None, :] < pos[:, None]  # j before i
        beats = (b > a) | ((b == a) & earlier)
        return jnp.sum(beats, axis=-1, dtype=jnp.int32)
    order = jnp.argsort(-keys, axis=-1, stable=True)  # keys >= 0, so -keys cannot overflow
    return jnp.argsort(order, axis=-1, stable=True).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("n", "m"))
def nm_mask_array(w: jax.Array, n: int, m: int) -> jax.Array:
    """N:M mask of one array along axis ``-2`` (``w.shape[-2] % m == 0``)."""
    moved = jnp.moveaxis(w, -2, -1)  # (..., out, in)
    grouped = magnitude_keys(moved).reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    keep = _group_ranks(grouped) < n
    return jnp.moveaxis(keep.reshape(moved.shape), -1, -2)


def nm(params: Any, n: int = 2, m: int = 4, *, where: Selector = prunable) -> Any:
    """N:M mask tree: ``n`` kept out of every ``m`` consecutive entries along axis ``-2``.

    Args:
      params: a pytree of arrays.
      n, m: keep ``n`` of every ``m`` (``0 <= n < m``); sparsity ``1 - n/m``.
      where: selector; default :func:`prunable`. Selected leaves need ``ndim >= 2`` and a
        contracting dimension ``shape[-2]`` divisible by ``m``.

    Returns:
      A mask tree (bool, True = kept; None for unselected leaves).

    Raises:
      TypeError: non-int ``n``/``m``; a selected non-floating leaf.
      ValueError: ``m <= 0``, ``n < 0`` or ``n >= m``; a selected leaf with ``ndim < 2`` or
        ``shape[-2] % m != 0`` (the message names the leaf).
    """
    _check_nm(n, m)
    if not callable(where):
        raise TypeError(f"where: expected a selector (path, leaf) -> bool, got {where!r}")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    chosen = [i for i, (p, x) in enumerate(leaves) if where(p, x)]
    for i in chosen:
        path, leaf = leaves[i]
        check_selected_floating(path, leaf)
        if leaf.ndim < 2:
            raise ValueError(
                f"params: leaf {path_str(path)!r} with shape {tuple(leaf.shape)} was selected "
                "for N:M; expected ndim >= 2 (groups run along axis -2)"
            )
        if leaf.shape[-2] % m:
            raise ValueError(
                f"params: leaf {path_str(path)!r} with shape {tuple(leaf.shape)} has contracting "
                f"dimension {leaf.shape[-2]} (axis -2), not divisible by m={m}"
            )
    out: list[Any] = [None] * len(leaves)
    for i in chosen:
        out[i] = nm_mask_array(leaves[i][1], n, m)
    return jax.tree_util.tree_unflatten(treedef, out)
