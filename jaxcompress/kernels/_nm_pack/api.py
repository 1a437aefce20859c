"""Public pack / unpack entry points (fused XLA on every backend)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcompress.kernels._common import FLOAT_DTYPES, MetaLayout, check_array, check_nm
from jaxcompress.kernels._nm_mask.reference import nm_violations_reference
from jaxcompress.kernels._nm_pack.format import PackedNM, check_packed
from jaxcompress.kernels._nm_pack.reference import pack_reference, unpack_reference


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def pack_nm(w: jax.Array, n: int = 2, m: int = 4) -> PackedNM:
    """Packs an N:M-sparse ``(K, N)`` weight into value planes + index words (layout v2).

    Groups are ``m`` consecutive rows of the contracting axis ``K`` (the ``in`` axis of a
    Flax Dense kernel), per column. Of every group the ``n`` kept entries are stored in index
    order in ``values`` ``(n, N, K/m)`` and their in-group indices in ``meta`` (layout in
    :class:`PackedNM` and :class:`MetaLayout`). Bytes: ``K*N*(n/m)*itemsize`` of values plus
    ``K*N*(n/m)*bits/8`` of indices; for bf16 2:4 that is 9/16 of the dense weight (36 of
    64 bits per group), the 1.78x bandwidth ceiling of Mishra et al. (2021),
    arXiv:2104.08378. Runs as one fused XLA computation on every backend.

    Other layouts reshape to 2-D first: a Conv kernel ``(kh, kw, in, out)`` becomes
    ``w.reshape(kh*kw*in, out)`` (its im2col order; when ``in % m == 0`` the groups are the
    ``in``-axis groups of ``nm_mask(w, axis=-2)``; a 1x1 conv is just ``(in, out)``), and a
    stack of layers ``(L, K, N)`` is packed layer by layer (a Python loop, or ``jax.vmap``
    under which the check below is skipped).

    Args:
      w: ``(K, N)`` float32/bfloat16/float16 weight with ``K % m == 0``.
      n: entries kept per group, ``1 <= n < m``.
      m: group size, ``2 <= m <= 16``.

    Returns:
      :class:`PackedNM` with ``unpack_nm(pack_nm(w)) == w`` bit for bit.

    Raises:
      ValueError: if ``w`` is concrete and some group has more than ``n`` nonzeros (the
        message gives the count). Under ``jit``/``vmap`` ``w`` is a tracer and cannot be
        checked without a host sync, so no error is raised; instead each group keeps its
        ``n`` largest magnitudes, i.e. ``pack_nm(w)`` packs ``w * nm_mask(w, n, m)``. Call
        :func:`nm_violations` inside the jitted code to detect that case.
    """
    n, m = check_nm(n, m)
    w = check_array("w", w, ndim=2)
    if jnp.dtype(w.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"w must be float32, bfloat16 or float16, got dtype {w.dtype}")
    k, cols = w.shape
    if k % m:
        raise ValueError(
            f"w.shape[0]={k} (the contracting axis K of a (K, N) weight) must be divisible by "
            f"m={m}; got w of shape {tuple(w.shape)}"
        )
    if _is_concrete(w) and w.size:
        bad = int(nm_violations_reference(w, n, m))
        if bad:
            raise ValueError(
                f"w is not {n}:{m} sparse along axis 0: {bad} of {k // m * cols} groups of {m} "
                f"have more than {n} nonzeros; apply nm_mask first (w * nm_mask(w, {n}, {m}))"
            )
    layout = MetaLayout(n, m, jnp.dtype(w.dtype).itemsize)
    stride = layout.stride(k // m)
    if w.size == 0:
        groups = k // m
        values = jnp.zeros((n, cols, groups), w.dtype)
        meta = jnp.zeros((n, cols, layout.words(groups, stride)), layout.word_dtype)
    else:
        values, meta = pack_reference(w, n, m)
    return PackedNM(values=values, meta=meta, shape=(int(k), int(cols)), n=n, m=m, stride=stride)


def unpack_nm(packed: PackedNM) -> jax.Array:
    """Dense ``(K, N)`` weight of a :class:`PackedNM`; the exact inverse of :func:`pack_nm`.

    Args:
      packed: output of :func:`pack_nm` (or a pytree-mapped copy of one).
    """
    packed = check_packed("packed", packed)
    if packed.values.size == 0:
        return jnp.zeros(packed.shape, packed.values.dtype)
    return unpack_reference(
        packed.values, packed.meta, packed.shape, packed.n, packed.m, packed.stride
    )
