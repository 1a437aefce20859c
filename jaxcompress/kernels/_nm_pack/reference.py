"""Fused-XLA N:M pack / unpack: the specification of the packed layout and its fast path.

Both are single ``jit``-compiled functions of elementwise ops, a transpose and reshapes, so
XLA fuses each into a few passes over memory; they run on every backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxcompress.kernels._common import MetaLayout
from jaxcompress.masks._nm import magnitude_ranks


def kept_slots(w: jax.Array, n: int, m: int) -> tuple[list[jax.Array], list[jax.Array]]:
    """The ``n`` kept entries of every group and their in-group indices, slot by slot.

    Returns ``(values, indices)``: two lists of ``n`` arrays ``(K/m, N)``. The kept set is the
    N:M magnitude mask (largest ``|w|``, ties to the lowest index; the ranks of
    :func:`jaxcompress.masks._nm.magnitude_ranks`, the rule of .
    For a weight that already satisfies N:M this is every nonzero plus the lowest-index zeros
    of the group, so packing is lossless. Slot ``t`` holds the kept member with exactly ``t``
    kept members before it. Only elementwise compares and selects over the ``m`` members
    (no sort, scan or gather), so XLA fuses it with the reads of ``w``.
    """
    k, cols = w.shape
    groups = w.reshape(k // m, m, cols)
    members = [groups[:, c, :] for c in range(m)]
    kept = [rank < n for rank in magnitude_ranks(members)]
    values = [jnp.zeros_like(members[0]) for _ in range(n)]
    indices = [jnp.zeros(members[0].shape, jnp.int32) for _ in range(n)]
    before = jnp.zeros(members[0].shape, jnp.int32)  # kept members before member c
    for c in range(m):
        for t in range(n):
            here = kept[c] & (before == t)
            values[t] = jnp.where(here, members[c], values[t])
            indices[t] = jnp.where(here, c, indices[t])
        before = before + kept[c].astype(jnp.int32)
    return values, indices


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

    ``values[t, j, g] = w[g*m + idx[t, j, g], j]`` with the slots of :func:`kept_slots`,
    and ``meta`` = :func:`pack_fields` of ``idx``.
    """
    k, _ = w.shape
    layout = MetaLayout(n, m, w.dtype.itemsize)
    values, indices = kept_slots(w, n, m)
    values = jnp.stack(values).transpose(0, 2, 1)  # (n, N, G)
    meta = pack_fields(jnp.stack(indices).transpose(0, 2, 1), layout, layout.stride(k // m))
    return values, meta


def unpack_rows(
    values: jax.Array, meta: jax.Array, shape: tuple[int, int], n: int, m: int, stride: int
) -> jax.Array:
    """The dense weight transposed, ``(N, K)``: ``W^T[j, g*m + c] = values[t, j, g]`` where
    ``idx[t, j, g] = c``, zero elsewhere (built with selects, so values round-trip bit for
    bit, including ``-0.0``). Row ``j`` is output ``j``'s groups in order, so this is
    elementwise over the planes with no transpose."""
    k, cols = shape
    layout = MetaLayout(n, m, values.dtype.itemsize)
    idx = unpack_fields(meta, k // m, layout, stride)
    dense = []
    for c in range(m):
        slot = jnp.zeros(values.shape[1:], values.dtype)
        for t in range(n):
            slot = jnp.where(idx[t] == c, values[t], slot)
        dense.append(slot)  # (N, G)
    return jnp.stack(dense, axis=-1).reshape(cols, k)


@functools.partial(jax.jit, static_argnames=("shape", "n", "m", "stride"))
def unpack_reference(
    values: jax.Array, meta: jax.Array, shape: tuple[int, int], n: int, m: int, stride: int
) -> jax.Array:
    """Dense ``(K, N)`` weight from ``(values, meta)``: the exact inverse of packing,
    ``unpack_rows(...).T``."""
    return unpack_rows(values, meta, shape, n, m, stride).T
