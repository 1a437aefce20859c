"""Pallas kernel for the N:M magnitude mask (Triton on GPU, or interpret mode anywhere).

A program owns ``block_groups`` groups of ``m`` rows by ``block_cols`` columns. It loads
member ``c`` of every group with one strided read (rows ``c, c+m, c+2m, ...``), ranks the
``m`` members elementwise (:func:`jaxcompress.kernels._common.magnitude_ranks`) and writes
the mask back with strided stores, so no reshape or gather runs inside the kernel and all
loaded tiles are ``(block_groups, block_cols)``, powers of two as Triton requires.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxcompress.kernels._common import (
    magnitude_ranks,
    next_power_of_2,
    pl,
    triton_compiler_params,
)

_BLOCK_GROUPS = 32
_BLOCK_COLS = 128


def _mask_kernel(w_ref, mask_ref, *, n: int, m: int, block_groups: int):
    members = [w_ref[pl.ds(c, block_groups, stride=m), :] for c in range(m)]
    ranks = magnitude_ranks(members)
    for c in range(m):
        mask_ref[pl.ds(c, block_groups, stride=m), :] = (ranks[c] < n).astype(jnp.int8)


@functools.partial(jax.jit, static_argnames=("n", "m", "interpret"))
def nm_mask_pallas(w: jax.Array, n: int, m: int, *, interpret: bool) -> jax.Array:
    """Pallas N:M mask of a ``(K, C)`` array; same contract as ``nm_mask_reference``.

    Columns are zero-padded to a multiple of the column tile and groups to a multiple of the
    group tile (padding is sliced off; it never mixes with real groups).
    """
    k, cols = w.shape
    num_groups = k // m
    block_groups = min(_BLOCK_GROUPS, next_power_of_2(num_groups))
    block_cols = min(_BLOCK_COLS, next_power_of_2(cols))
    padded_groups = -(-num_groups // block_groups) * block_groups
    padded_cols = -(-cols // block_cols) * block_cols
    wp = jnp.pad(w, ((0, (padded_groups - num_groups) * m), (0, padded_cols - cols)))
    rows = block_groups * m
    mask = pl.pallas_call(
        functools.partial(_mask_kernel, n=n, m=m, block_groups=block_groups),
        out_shape=jax.ShapeDtypeStruct(wp.shape, jnp.int8),
        grid=(padded_groups // block_groups, padded_cols // block_cols),
        in_specs=[pl.BlockSpec((rows, block_cols), lambda i, j: (i, j))],
        out_specs=pl.BlockSpec((rows, block_cols), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=None if interpret else triton_compiler_params(),
        name="nm_mask",
    )(wp)
    return mask[:k, :cols].astype(jnp.bool_)
