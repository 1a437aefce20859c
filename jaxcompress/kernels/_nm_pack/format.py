"""``PackedNM``: a 2-D weight in compressed N:M form, registered as a pytree."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxcompress.kernels._common import META_DTYPE, MetaLayout, check_nm


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedNM:
    """An N:M-sparse ``(K, N)`` weight ``W`` stored as kept values plus packed indices.

    Pytree children: ``values`` and ``meta``; static aux data: ``shape``, ``n``, ``m``
    (so ``jit``, ``grad``, Orbax and shardings see two arrays).

    Attributes:
      values: ``(K*n/m, N)`` kept entries, row ``g*n + t`` = the ``t``-th kept entry (in
        increasing index order) of group ``g`` (rows ``g*m .. g*m+m-1`` of ``W``).
      meta: ``(ceil(K*n/m / per_word), N)`` ``uint8`` words of in-group indices; bit layout
        in :class:`jaxcompress.kernels._common.MetaLayout` (2:4: four 2-bit indices per
        byte, index of value row ``4w+f`` at bits ``2f..2f+1`` of ``meta[w]``).
      shape: ``(K, N)`` of the dense weight; ``K`` is the contracting axis.
      n, m: the pattern (``n`` kept per group of ``m``).

    ``dtype`` is ``values.dtype``. Conv or stacked weights are packed after a reshape to
    2-D, see :func:`jaxcompress.kernels.pack_nm`.
    """

    values: jax.Array
    meta: jax.Array
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
    n: int = dataclasses.field(metadata=dict(static=True))
    m: int = dataclasses.field(metadata=dict(static=True))

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def layout(self) -> MetaLayout:
        return MetaLayout(self.n, self.m)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed form (values + metadata)."""
        return int(self.values.size * np.dtype(self.values.dtype).itemsize + self.meta.size)

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the dense ``(K, N)`` weight in ``dtype``."""
        return int(self.shape[0] * self.shape[1] * np.dtype(self.values.dtype).itemsize)


def check_packed(name: str, packed) -> PackedNM:
    """Validates a :class:`PackedNM` (types, pattern, and the shapes its layout implies)."""
    if not isinstance(packed, PackedNM):
        raise TypeError(f"{name} must be a PackedNM (from pack_nm), got {type(packed).__name__}")
    n, m = check_nm(packed.n, packed.m)
    shape = packed.shape
    if (
        not isinstance(shape, tuple)
        or len(shape) != 2
        or not all(isinstance(d, int) and d >= 0 for d in shape)
    ):
        raise ValueError(f"{name}.shape must be a (K, N) tuple of ints, got {shape!r}")
    k, cols = shape
    if k % m:
        raise ValueError(f"{name}.shape[0]={k} must be divisible by {name}.m={m}")
    layout = MetaLayout(n, m)
    want_values = (layout.value_rows(k), cols)
    want_meta = (layout.meta_rows(k), cols)
    if tuple(packed.values.shape) != want_values:
        raise ValueError(
            f"{name}.values must have shape {want_values} for shape={shape}, {n}:{m}; got "
            f"{tuple(packed.values.shape)}"
        )
    if tuple(packed.meta.shape) != want_meta or packed.meta.dtype != META_DTYPE:
        raise ValueError(
            f"{name}.meta must be {np.dtype(META_DTYPE).name}{want_meta} for shape={shape}, "
            f"{n}:{m}; got {packed.meta.dtype}{tuple(packed.meta.shape)}"
        )
    return packed
