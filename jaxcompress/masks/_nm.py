"""N:M semi-structured masks (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks").

In every group of ``m`` consecutive entries along the contracting axis keep the ``n`` with
the largest ``|w|``. The contracting axis is axis ``-2``: the ``in`` axis of a Flax Dense
kernel ``(in, out)`` and of a Conv kernel ``(kh, kw, in, out)``. This is the grouping of the
CrAM reference code's N:M compressor (``NMTopkCrAM``, Peste et al. 2023) once torch's
``(out, in, ...)`` layout is mapped to Flax's, and the one sparse tensor cores consume.

Ties: inside a group, entries are ranked by ``|w|`` descending then by position along the
axis ascending, so among equal magnitudes the lower ``in`` index is kept; every group keeps
exactly ``n``. Magnitudes are compared as float32 bit patterns (NaN ranks above inf):

    M[g m + c] = [rank_g(c) < n],
    rank_g(c) = #{c' : |w_c'| > |w_c|} + #{c' < c : |w_c'| = |w_c|}.

This module is the one implementation of that rule: :func:`jaxcompress.kernels.nm_mask`
(its reference path and, through :func:`magnitude_ranks`, its Pallas kernel),
:func:`jaxcompress.kernels.pack_nm` and the CrAM/AC-DC N:M compressors all use it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress._checks import check_nm
from jaxcompress.masks._magnitude import magnitude_keys
from jaxcompress.masks._selection import (
    Selector,
    check_selected_floating,
    check_selection,
    path_str,
    prunable,
)

#: Largest ``m`` ranked by pairwise comparison (``m * m`` work per group); larger ``m`` sorts.
_PAIRWISE_MAX_M = 32


def magnitude_ranks(members: list[jax.Array]) -> list[jax.Array]:
    """Rank of each member of a group by decreasing magnitude, ties to the lowest index.

    ``members[c]`` holds member ``c`` of many groups (any common shape, floating dtype).
    Returns int32 arrays ``rank[c] = #{c' : key_c' > key_c} + #{c' < c : key_c' == key_c}``
    with ``key`` = :func:`magnitude_keys`: a permutation of ``0..m-1`` in every group, so
    exactly ``n`` members have ``rank < n``. Elementwise ops only, so the same code runs in
    XLA and inside the Pallas kernels of :mod:`jaxcompress.kernels`.
    """
    keys = [magnitude_keys(a) for a in members]
    ranks = []
    for c, kc in enumerate(keys):
        rank = jnp.zeros(kc.shape, jnp.int32)
        for c2, kc2 in enumerate(keys):
            if c2 == c:
                continue
            beats = (kc2 >= kc) if c2 < c else (kc2 > kc)
            rank = rank + beats.astype(jnp.int32)
        ranks.append(rank)
    return ranks


@functools.partial(jax.jit, static_argnames=("n", "m"))
def nm_mask_array(w: jax.Array, n: int, m: int) -> jax.Array:
    """N:M mask of one array along axis ``-2`` (unchecked: ``w.shape[-2] % m == 0``)."""
    *lead, k, out = w.shape
    grouped = w.reshape(*lead, k // m, m, out)
    if m <= _PAIRWISE_MAX_M:
        ranks = magnitude_ranks([grouped[..., c, :] for c in range(m)])
        keep = jnp.stack([r < n for r in ranks], axis=-2)
    else:
        keys = magnitude_keys(grouped)
        order = jnp.argsort(-keys, axis=-2, stable=True)  # keys >= 0: -keys cannot overflow
        keep = jnp.argsort(order, axis=-2, stable=True) < n
    return keep.reshape(w.shape)


def nm(
    params: Any, n: int = 2, m: int = 4, *, where: Selector = prunable, strict: bool = False
) -> Any:
    """N:M mask tree: ``n`` kept out of every ``m`` consecutive entries along axis ``-2``.

    Args:
      params: a pytree of arrays.
      n, m: keep ``n`` of every ``m`` (``1 <= n < m``); sparsity ``1 - n/m``.
      where: selector; default :func:`prunable`. Selected leaves need ``ndim >= 2`` and a
        contracting dimension ``shape[-2]`` divisible by ``m``.
      strict: raise a ``ValueError`` instead of an :class:`EmptySelectionWarning` when no
        leaf is selected.

    Returns:
      A mask tree (bool, True = kept; None for unselected leaves).

    Raises:
      TypeError: non-int ``n``/``m``; a selected non-floating leaf.
      ValueError: ``m < 2``, ``n < 1`` or ``n >= m``; a selected leaf with ``ndim < 2`` or
        ``shape[-2] % m != 0`` (the message names the leaf).
    """
    n, m = check_nm(n, m)
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
    check_selection("nm", leaves, chosen, where, strict)
    out: list[Any] = [None] * len(leaves)
    for i in chosen:
        out[i] = nm_mask_array(leaves[i][1], n, m)
    return jax.tree_util.tree_unflatten(treedef, out)
