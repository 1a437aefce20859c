"""Pure-jnp N:M matmul: the specification and the CPU path."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxcompress.kernels._nm_pack.reference import unpack_reference


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

    computed as ``jnp.dot(x, unpack(values, meta))`` with ``preferred_element_type=float32``
    and cast back to ``x.dtype``.
    """
    w = unpack_reference(values, meta, shape, n, m, stride)
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
