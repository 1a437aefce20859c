"""Pallas kernels for N:M pack and unpack (Triton on GPU, or interpret mode anywhere).

Both walk a tile of ``block_groups`` groups by ``block_cols`` columns in *phases*: the
tile's groups are split by ``g mod period_groups`` (see
:class:`~jaxcompress.kernels._common.MetaLayout`), so the value rows and index words of one
phase sit at a fixed stride and are read or written with strided refs. Inside the kernel
there are only strided loads/stores and elementwise ops (compare, select, shift, or), no
reshape, gather or scatter; every tensor is ``(block_groups / period_groups, block_cols)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxcompress.kernels._common import (
    META_DTYPE,
    MetaLayout,
    load_words,
    magnitude_ranks,
    next_power_of_2,
    phase_fields,
    pl,
    triton_compiler_params,
)

_BLOCK_GROUPS = 64
_BLOCK_COLS = 128


def _select_chain(conds: list[jax.Array], values: list, fill):
    out = fill
    for cond, value in zip(conds, values, strict=True):
        out = jnp.where(cond, value, out)
    return out


def _pack_kernel(w_ref, values_ref, meta_ref, *, layout: MetaLayout, rows: int):
    n, m, per, bits = layout.n, layout.m, layout.per_word, layout.bits
    words: dict[int, jax.Array] = {}  # meta word index -> OR of its fields
    for q in range(layout.period_groups):
        members = [w_ref[pl.ds(q * m + c, rows, stride=layout.period_dense), :] for c in range(m)]
        ranks = magnitude_ranks(members)
        kept = [r < n for r in ranks]
        before = jnp.zeros(members[0].shape, jnp.int32)  # kept members before c
        slot = []
        for c in range(m):
            slot.append(before)
            before = before + kept[c].astype(jnp.int32)
        for t in range(n):
            conds = [kept[c] & (slot[c] == t) for c in range(m)]
            value = _select_chain(conds, members, jnp.zeros_like(members[0]))
            index = _select_chain(conds, list(range(m)), 0).astype(jnp.int32)
            f = q * n + t
            values_ref[pl.ds(f, rows, stride=layout.period_rows), :] = value
            field = index << ((f % per) * bits)
            w = f // per
            words[w] = words[w] | field if w in words else field
    for w in range(layout.period_words):
        meta_ref[pl.ds(w, rows, stride=layout.period_words), :] = words[w].astype(META_DTYPE)


def _unpack_kernel(values_ref, meta_ref, w_ref, *, layout: MetaLayout, rows: int):
    m = layout.m
    words = load_words(meta_ref, 0, rows, layout)
    for q in range(layout.period_groups):
        idx, vals = phase_fields(words, values_ref, 0, q, rows, layout)
        for c in range(m):
            dense = _select_chain([i == c for i in idx], vals, jnp.zeros_like(vals[0]))
            w_ref[pl.ds(q * m + c, rows, stride=layout.period_dense), :] = dense


def _tiles(num_groups: int, cols: int, layout: MetaLayout) -> tuple[int, int, int, int]:
    """Group tile (multiple of ``period_groups``, rows per phase a power of two), column
    tile, and the padded group/column counts."""
    pg = layout.period_groups
    rows = min(_BLOCK_GROUPS // pg, next_power_of_2(-(-num_groups // pg)))
    rows = max(rows, 1)
    block_groups = rows * pg
    block_cols = min(_BLOCK_COLS, next_power_of_2(cols))
    padded_groups = -(-num_groups // block_groups) * block_groups
    padded_cols = -(-cols // block_cols) * block_cols
    return block_groups, block_cols, padded_groups, padded_cols


@functools.partial(jax.jit, static_argnames=("n", "m", "interpret"))
def pack_pallas(w: jax.Array, n: int, m: int, *, interpret: bool):
    """Pallas pack of a ``(K, N)`` weight; same contract and output as ``pack_reference``."""
    layout = MetaLayout(n, m)
    k, cols = w.shape
    num_groups = k // m
    block_groups, block_cols, pgroups, pcols = _tiles(num_groups, cols, layout)
    rows = block_groups // layout.period_groups
    wp = jnp.pad(w, ((0, (pgroups - num_groups) * m), (0, pcols - cols)))
    vrows = block_groups * n
    wrows = vrows // layout.per_word
    values, meta = pl.pallas_call(
        functools.partial(_pack_kernel, layout=layout, rows=rows),
        out_shape=(
            jax.ShapeDtypeStruct((pgroups * n, pcols), w.dtype),
            jax.ShapeDtypeStruct((pgroups * n // layout.per_word, pcols), META_DTYPE),
        ),
        grid=(pgroups // block_groups, pcols // block_cols),
        in_specs=[pl.BlockSpec((block_groups * m, block_cols), lambda i, j: (i, j))],
        out_specs=(
            pl.BlockSpec((vrows, block_cols), lambda i, j: (i, j)),
            pl.BlockSpec((wrows, block_cols), lambda i, j: (i, j)),
        ),
        interpret=interpret,
        compiler_params=None if interpret else triton_compiler_params(),
        name="nm_pack",
    )(wp)
    values = values[: num_groups * n, :cols]
    meta = meta[: layout.meta_rows(k), :cols]
    used = (num_groups * n) % layout.per_word
    if used:  # zero the fields of padding groups in the last word, as the layout specifies
        keep = jnp.asarray((1 << (used * layout.bits)) - 1, META_DTYPE)
        meta = meta.at[-1].set(meta[-1] & keep)
    return values, meta


@functools.partial(jax.jit, static_argnames=("shape", "n", "m", "interpret"))
def unpack_pallas(values, meta, *, shape: tuple[int, int], n: int, m: int, interpret: bool):
    """Pallas unpack to the dense ``(K, N)`` weight; same output as ``unpack_reference``."""
    layout = MetaLayout(n, m)
    k, cols = shape
    num_groups = k // m
    block_groups, block_cols, pgroups, pcols = _tiles(num_groups, cols, layout)
    rows = block_groups // layout.period_groups
    vrows = block_groups * n
    wrows = vrows // layout.per_word
    values = jnp.pad(values, ((0, pgroups * n - values.shape[0]), (0, pcols - cols)))
    meta = jnp.pad(meta, ((0, pgroups * n // layout.per_word - meta.shape[0]), (0, pcols - cols)))
    dense = pl.pallas_call(
        functools.partial(_unpack_kernel, layout=layout, rows=rows),
        out_shape=jax.ShapeDtypeStruct((pgroups * m, pcols), values.dtype),
        grid=(pgroups // block_groups, pcols // block_cols),
        in_specs=[
            pl.BlockSpec((vrows, block_cols), lambda i, j: (i, j)),
            pl.BlockSpec((wrows, block_cols), lambda i, j: (i, j)),
        ],
        out_specs=pl.BlockSpec((block_groups * m, block_cols), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=None if interpret else triton_compiler_params(),
        name="nm_unpack",
    )(values, meta)
    return dense[:k, :cols]
