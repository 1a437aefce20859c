"""Pallas N:M matmul: stream packed values + index words, expand in registers, dense dot.

No JAX path reaches the 2:4 sparse tensor cores, so the kernel saves memory traffic instead:
it reads ``K*N*n/m`` values and ``K*N*n/m*bits/8`` bytes of indices instead of ``K*N``
values (9/16 of the dense bytes for bf16 2:4, a 1.78x ceiling for bandwidth-bound shapes).

Program ``(i, j, s)`` owns the output tile ``y[i*bm:(i+1)*bm, j*bn:(j+1)*bn]`` and the
``s``-th of ``split_k`` slices of ``K``. Each inner step consumes ``block_k`` rows of ``W``:
it loads the step's index words once, then for every phase ``q`` (groups ``g = q mod
period_groups``) and slot ``c < m`` it builds the dense rows ``g*m + c`` of ``W`` with
``n`` selects on the loaded values, loads the matching strided columns of ``x`` and
accumulates one ``(bm, block_k/period_dense) @ (block_k/period_dense, bn)`` dot in float32:

.. math:: y = \\sum_{q, c} x_{[:, \\{g m + c\\}]}\\; W_{[\\{g m + c\\}, :]}

which is ``x @ W`` with ``K`` visited in a permuted order. Loads are strided refs (rows of
``values``/``meta`` stay contiguous along ``N``), so the kernel needs no reshape, gather or
concatenate; every tensor has power-of-two dimensions as Triton requires.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton

from jaxcompress.kernels._common import (
    MetaLayout,
    load_words,
    phase_fields,
    pl,
    triton_compiler_params,
)
from jaxcompress.kernels._nm_matmul.config import NMMatmulConfig

_PRECISION = jax.lax.Precision.HIGHEST
"""IEEE float32 dots for float32 inputs (Triton would use TF32, ~1e-3 relative error);
no effect on 16-bit inputs."""


def _matmul_kernel(
    x_ref, v_ref, meta_ref, o_ref, *, layout: MetaLayout, block_k: int, steps: int, valid_rows
):
    n, m = layout.n, layout.m
    rows = block_k // layout.period_dense
    value_step = block_k // m * n
    word_step = value_step // layout.per_word
    block_m = x_ref.shape[0]
    block_n = v_ref.shape[-1]

    def step(s, acc):
        x0, v0, w0 = s * block_k, s * value_step, s * word_step
        words = load_words(meta_ref, w0, rows, layout)
        for q in range(layout.period_groups):
            idx, vals = phase_fields(words, v_ref, v0, q, rows, layout)
            for c in range(m):
                w_rows = jnp.zeros_like(vals[0])
                for t in range(n):
                    w_rows = jnp.where(idx[t] == c, vals[t], w_rows)
                x_cols = x_ref[:, pl.ds(x0 + q * m + c, rows, stride=layout.period_dense)]
                acc = acc + jnp.dot(
                    x_cols, w_rows, precision=_PRECISION, preferred_element_type=jnp.float32
                )
        return acc

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((block_m, block_n), jnp.float32))
    if valid_rows is None:
        o_ref[...] = acc.astype(o_ref.dtype)
    else:  # rows of x beyond the batch are zero padding: do not spend bandwidth on them
        row = pl.program_id(0) * block_m + jax.lax.broadcasted_iota(jnp.int32, acc.shape, 0)
        pltriton.store(o_ref, acc.astype(o_ref.dtype), mask=row < valid_rows)


@functools.partial(jax.jit, static_argnames=("shape", "n", "m", "config", "interpret"))
def nm_matmul_pallas(
    x: jax.Array,
    values: jax.Array,
    meta: jax.Array,
    *,
    shape: tuple[int, int],
    n: int,
    m: int,
    config: NMMatmulConfig,
    interpret: bool,
) -> jax.Array:
    """``x (M, K) @ W (K, N)`` with ``W`` packed; float32 accumulation, ``x.dtype`` output.

    ``config`` must already be checked for this shape (:meth:`NMMatmulConfig.check`).
    ``x`` is zero-padded along ``M`` to a multiple of ``block_m``; the output rows of the
    padding are masked out of the stores (with ``split_k > 1`` the float32 partial sums of
    a batch-1 call would otherwise move ``16x`` the bytes they need).
    """
    layout = MetaLayout(n, m)
    k, cols = shape
    out_dtype = x.dtype
    rows_x = x.shape[0]
    bm, bn, bk, sk = config.block_m, config.block_n, config.block_k, config.split_k
    padded = -(-rows_x // bm) * bm
    if padded != rows_x:
        x = jnp.pad(x, ((0, padded - rows_x), (0, 0)))
    k_split = k // sk
    v_split = k_split // m * n
    w_split = v_split // layout.per_word
    steps = k_split // bk
    kernel = functools.partial(
        _matmul_kernel,
        layout=layout,
        block_k=bk,
        steps=steps,
        valid_rows=None if padded == rows_x else rows_x,
    )
    grid = (padded // bm, cols // bn, sk)
    in_specs = [
        pl.BlockSpec((bm, k_split), lambda i, j, s: (i, s)),
        pl.BlockSpec((v_split, bn), lambda i, j, s: (s, j)),
        pl.BlockSpec((w_split, bn), lambda i, j, s: (s, j)),
    ]
    if sk == 1:
        out_shape = jax.ShapeDtypeStruct((padded, cols), out_dtype)
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((sk, padded, cols), jnp.float32)
        out_spec = pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j))
    y = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        interpret=interpret,
        compiler_params=None
        if interpret
        else triton_compiler_params(num_warps=config.num_warps, num_stages=config.num_stages),
        name="nm_matmul",
    )(x, values, meta)
    if sk > 1:  # slice first: the padded rows were never written
        return jnp.sum(y[:, :rows_x], axis=0).astype(out_dtype)
    return y[:rows_x]
