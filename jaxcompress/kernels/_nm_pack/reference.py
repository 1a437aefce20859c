"""Pure-jnp N:M pack / unpack: the specification of the packed format and the CPU path."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxcompress.kernels._common import META_DTYPE, MetaLayout
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


def pack_words(idx_rows: jax.Array, layout: MetaLayout) -> jax.Array:
    """Packs ``(R, N)`` indices into ``(ceil(R / per_word), N)`` uint8 words (little-endian
    fields, unused trailing fields zero)."""
    rows, cols = idx_rows.shape
    per = layout.per_word
    words = -(-rows // per)
    padded = jnp.pad(idx_rows.astype(jnp.int32), ((0, words * per - rows), (0, 0)))
    fields = padded.reshape(words, per, cols)
    shifts = (jnp.arange(per, dtype=jnp.int32) * layout.bits)[None, :, None]
    return jnp.sum(fields << shifts, axis=1).astype(META_DTYPE)


def unpack_words(meta: jax.Array, rows: int, layout: MetaLayout) -> jax.Array:
    """Inverse of :func:`pack_words`: ``(rows, N)`` int32 indices."""
    words, cols = meta.shape
    shifts = (jnp.arange(layout.per_word, dtype=jnp.int32) * layout.bits)[None, :, None]
    fields = (meta.astype(jnp.int32)[:, None, :] >> shifts) & layout.field_mask
    return fields.reshape(words * layout.per_word, cols)[:rows]


@functools.partial(jax.jit, static_argnames=("n", "m"))
def pack_reference(w: jax.Array, n: int, m: int) -> tuple[jax.Array, jax.Array]:
    """Packs a ``(K, N)`` weight into ``(values, meta)``; see :class:`PackedNM`.

    ``values[g*n + t, j] = w[g*m + idx[g, t, j], j]`` with ``idx`` from
    :func:`selected_indices`, and ``meta`` = :func:`pack_words` of ``idx``.
    """
    k, cols = w.shape
    layout = MetaLayout(n, m)
    idx = selected_indices(w, n, m)
    groups = w.reshape(k // m, m, cols)
    values = jnp.take_along_axis(groups, idx, axis=1).reshape(k // m * n, cols)
    meta = pack_words(idx.reshape(k // m * n, cols), layout)
    return values, meta


@functools.partial(jax.jit, static_argnames=("shape", "n", "m"))
def unpack_reference(values: jax.Array, meta: jax.Array, shape: tuple[int, int], n: int, m: int):
    """Dense ``(K, N)`` weight from ``(values, meta)``: the exact inverse of packing.

    ``W[g*m + c, j] = values[g*n + t, j]`` where ``idx[g, t, j] = c``, zero elsewhere (built
    with selects, so values round-trip bit for bit, including ``-0.0``).
    """
    k, cols = shape
    layout = MetaLayout(n, m)
    num_groups = k // m
    idx = unpack_words(meta, num_groups * n, layout).reshape(num_groups, n, cols)
    vals = values.reshape(num_groups, n, cols)
    dense = []
    for c in range(m):
        slot = jnp.zeros((num_groups, cols), values.dtype)
        for t in range(n):
            slot = jnp.where(idx[:, t, :] == c, vals[:, t, :], slot)
        dense.append(slot)
    return jnp.stack(dense, axis=1).reshape(k, cols)
