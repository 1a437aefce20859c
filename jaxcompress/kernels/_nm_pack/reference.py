"""Fused-XLA N:M pack / unpack: the specification of the packed layout and its fast path.

Both are single ``jit``-compiled functions of elementwise ops, a transpose and reshapes, so
XLA fuses each into a few passes over memory; they run on every backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxcompress.kernels._common import MetaLayout
from jaxcompress.kernels._nm_mask.reference import nm_mask_reference


def selected_indices(w: jax.Array, n: int, m: int) -> jax.Array:
    """In-group indices of the ``n`` entries kept per group, ascending: ``(G, n, N)`` int32.

    The kept set is the N:M magnitude mask (:func:`nm_mask_reference`: largest ``|w|``, ties
    to the lowest index). For a weight that already satisfies N:M this is every nonzero plus
    the lowest-index zeros of the group, so packing is lossless. Slot ``t`` of a group holds
    the member ``c`` that is kept and has exactly ``t`` kept members before it.
    """
    k, cols = w.shape
    keep = nm_mask_reference(w, n, m).reshape(k // m, m, cols)
    kept = [keep[:, c, :] for c in range(m)]
    before = jnp.cumsum(keep.astype(jnp.int32), axis=1)
    slots = []
    for t in range(n):
        idx = jnp.zeros((k // m, cols), jnp.int32)
        for c in range(m):
            idx = jnp.where(kept[c] & (before[:, c, :] == t + 1), c, idx)
        slots.append(idx)
    return jnp.stack(slots, axis=1)


def pack_fields(idx: jax.Array, layout: MetaLayout, stride: int) -> jax.Array:
    """Packs ``(n, N, G)`` indices into ``(n, N, words)`` index words (:class:`MetaLayout`)."""
    n, cols, groups = idx.shape
    per = layout.per_word
    periods = -(-groups // (per * stride))
    padded = jnp.pad(idx, ((0, 0), (0, 0), (0, periods * per * stride - groups)))
    fields = padded.astype(jnp.uint32).reshape(n, cols, periods, per, stride)
    shifts = (jnp.arange(per, dtype=jnp.uint32) * layout.bits)[:, None]
    words = jnp.sum(fields << shifts, axis=3, dtype=jnp.uint32)
    return words.reshape(n, cols, periods * stride).astype(layout.word_dtype)


def unpack_fields(meta: jax.Array, groups: int, layout: MetaLayout, stride: int) -> jax.Array:
    """Inverse of :func:`pack_fields`: ``(n, N, groups)`` int32 indices."""
    n, cols, words = meta.shape
    per = layout.per_word
    periods = words // stride
    shifts = (jnp.arange(per, dtype=jnp.uint32) * layout.bits)[:, None]
    w = meta.astype(jnp.uint32).reshape(n, cols, periods, 1, stride)
    fields = (w >> shifts) & jnp.uint32(layout.field_mask)
    return fields.reshape(n, cols, periods * per * stride)[..., :groups].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("n", "m"))
def pack_reference(w: jax.Array, n: int, m: int) -> tuple[jax.Array, jax.Array]:
    """Packs a ``(K, N)`` weight into ``(values, meta)``; see :class:`PackedNM`.

    ``values[t, j, g] = w[g*m + idx[g, t, j], j]`` with ``idx`` from
    :func:`selected_indices`, and ``meta`` = :func:`pack_fields` of ``idx``.
    """
    k, cols = w.shape
    layout = MetaLayout(n, m, w.dtype.itemsize)
    stride = layout.stride(k // m)
    idx = selected_indices(w, n, m)  # (G, n, N)
    groups = w.reshape(k // m, m, cols)
    values = jnp.take_along_axis(groups, idx, axis=1).transpose(1, 2, 0)
    meta = pack_fields(idx.transpose(1, 2, 0), layout, stride)
    return values, meta


@functools.partial(jax.jit, static_argnames=("shape", "n", "m", "stride"))
def unpack_reference(
    values: jax.Array, meta: jax.Array, shape: tuple[int, int], n: int, m: int, stride: int
) -> jax.Array:
    """Dense ``(K, N)`` weight from ``(values, meta)``: the exact inverse of packing.

    ``W[g*m + c, j] = values[t, j, g]`` where ``idx[t, j, g] = c``, zero elsewhere (built
    with selects, so values round-trip bit for bit, including ``-0.0``).
    """
    k, cols = shape
    layout = MetaLayout(n, m, values.dtype.itemsize)
    idx = unpack_fields(meta, k // m, layout, stride)
    dense = []
    for c in range(m):
        slot = jnp.zeros(values.shape[1:], values.dtype)
        for t in range(n):
            slot = jnp.where(idx[t] == c, values[t], slot)
        dense.append(slot)  # (N, G)
    return jnp.stack(dense, axis=-1).reshape(cols, k).T
