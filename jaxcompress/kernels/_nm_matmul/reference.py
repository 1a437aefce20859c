"""Pure-jnp N:M matmul: the specification and the CPU path."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxcompress.kernels._nm_pack.reference import unpack_rows


@functools.partial(jax.jit, static_argnames=("shape", "n", "m", "stride"))
def nm_matmul_reference(
    x: jax.Array,
    values: jax.Array,
    meta: jax.Array,
    shape: tuple[int, int],
    n: int,
    m: int,
    stride: int,
) -> jax.Array:
    """``y = x @ W`` for ``x`` ``(M, K)`` and ``W`` given packed, float32 accumulation.

    .. math:: y_{bj} = \\sum_{g}\\sum_{t<n} x_{b,\\,gm + \\mathrm{idx}_{t j g}}\\, v_{t j g}

    computed as ``x @ unpack(values, meta)`` with ``preferred_element_type=float32`` and cast
    back to ``x.dtype``. The product contracts ``x`` with the rows of the transposed weight
    (:func:`unpack_rows`), so no transpose is materialised: on a CPU, fusing the transpose
    into the unpacking made a batch-1 product of a 4096x4096 weight 5x slower.
    """
    w_t = unpack_rows(values, meta, shape, n, m, stride)  # (N, K)
    y = jax.lax.dot_general(x, w_t, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)
