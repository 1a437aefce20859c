"""Pure-jnp N:M magnitude mask: the specification and the CPU path."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxcompress.masks._nm import nm_mask_array


@functools.partial(jax.jit, static_argnames=("n", "m"))
def nm_mask_reference(w: jax.Array, n: int, m: int) -> jax.Array:
    """N:M magnitude mask of a ``(K, C)`` array, groups of ``m`` consecutive rows.

    Rows ``g*m .. g*m+m-1`` of every column form group ``g``. Within a group the entry of
    rank ``r`` (by decreasing ``|w|``; ties go to the lower index; NaN ranks above ``inf``) is
    kept iff ``r < n``:

    .. math:: M_{gm+c,\\,j} = [\\operatorname{rank}_{g,j}(c) < n],

    so every group keeps exactly ``n`` entries (Mishra et al., 2021, "Accelerating Sparse
    Deep Neural Networks", arXiv:2104.08378; Zhou et al., 2021, "Learning N:M Fine-grained
    Structured Sparse Neural Networks From Scratch", arXiv:2102.04010). This is
    :func:`jaxcompress.masks.nm`'s rule and code (``jaxcompress.masks._nm.nm_mask_array``)
    on axis 0 of a 2-D array.

    Args:
      w: ``(K, C)`` array with ``K % m == 0`` (checked by the caller).
      n: entries kept per group.
      m: group size.

    Returns:
      Boolean ``(K, C)`` mask, ``True`` = kept.
    """
    return nm_mask_array(w, n, m)


@functools.partial(jax.jit, static_argnames=("n", "m"))
def nm_violations_reference(w: jax.Array, n: int, m: int) -> jax.Array:
    """Number of groups (``m`` consecutive rows of a ``(K, C)`` array) with more than ``n``
    nonzeros, as an int32 scalar."""
    k, c = w.shape
    nonzero = (w.reshape(k // m, m, c) != 0).sum(axis=1)
    return jnp.sum(nonzero > n, dtype=jnp.int32)
