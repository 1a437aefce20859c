"""Public N:M mask entry points (fused XLA on every backend)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcompress.kernels._common import check_array, check_nm
from jaxcompress.kernels._nm_mask.reference import nm_mask_reference, nm_violations_reference


def _to_2d(w: jax.Array, axis: int, m: int, name: str = "w") -> tuple[jax.Array, int]:
    """Moves ``axis`` first and flattens the rest: ``(K, prod(other dims))``."""
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise TypeError(f"axis must be an int, got axis={axis!r}")
    if not -w.ndim <= axis < w.ndim:
        raise ValueError(f"axis={axis} is out of range for {name} of shape {tuple(w.shape)}")
    axis = axis % w.ndim
    k = w.shape[axis]
    if k % m:
        raise ValueError(
            f"{name}.shape[{axis}] (the contracting axis) must be divisible by m={m}, got "
            f"{name} of shape {tuple(w.shape)}"
        )
    moved = jnp.moveaxis(w, axis, 0)
    return moved.reshape(k, -1), axis


def nm_mask(
    w: jax.Array,
    n: int = 2,
    m: int = 4,
    *,
    axis: int = -2,
) -> jax.Array:
    """Magnitude N:M mask: in every group of ``m`` consecutive entries along ``axis``, keep
    the ``n`` largest ``|w|``.

    Groups run along the contracting axis: ``axis=-2`` is ``in`` for a Flax Dense kernel
    ``(in, out)`` and for a Conv kernel ``(kh, kw, in, out)``, the axis the 2:4 sparse tensor
    cores and :func:`pack_nm` group along. Ties go to the lowest index and NaN ranks above
    ``inf`` (magnitudes compare as float32 bit patterns), so every group keeps exactly ``n``
    entries; this is the rule of :func:`jaxcompress.masks.nm`. One fused XLA computation
    (elementwise ranks of the ``m`` members, no sort) on every backend.

    .. math:: M_{\\dots, gm+c, \\dots} = [\\operatorname{rank}_g(c) < n],\\quad
       \\operatorname{rank}_g(c) = \\#\\{c' : |w_{c'}| > |w_c|\\} +
       \\#\\{c' < c : |w_{c'}| = |w_c|\\}

    References: Mishra et al. (2021), arXiv:2104.08378; Zhou et al. (2021), arXiv:2102.04010.

    Args:
      w: real array; ``w.shape[axis]`` must be divisible by ``m``.
      n: entries kept per group, ``1 <= n < m``.
      m: group size, ``2 <= m <= 16``.
      axis: grouping axis (default ``-2``, the ``in`` axis of Flax kernels).

    Returns:
      Boolean array of ``w.shape``, ``True`` = kept.
    """
    n, m = check_nm(n, m)
    w = check_array("w", w, min_ndim=1)
    w2d, ax = _to_2d(w, axis, m)
    if w2d.size == 0:
        return jnp.zeros(w.shape, jnp.bool_)
    mask2d = nm_mask_reference(w2d, n, m)
    moved_shape = (w.shape[ax],) + tuple(d for i, d in enumerate(w.shape) if i != ax)
    return jnp.moveaxis(mask2d.reshape(moved_shape), 0, ax)


def nm_violations(w: jax.Array, n: int = 2, m: int = 4, *, axis: int = -2) -> jax.Array:
    """Number of groups of ``m`` along ``axis`` with more than ``n`` nonzeros (int32 scalar).

    Zero iff ``w`` satisfies the N:M pattern. Pure jnp, so it works under ``jit``/``vmap``.
    """
    n, m = check_nm(n, m)
    w = check_array("w", w, min_ndim=1)
    w2d, _ = _to_2d(w, axis, m)
    return nm_violations_reference(w2d, n, m)
