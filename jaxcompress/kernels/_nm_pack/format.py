"""``PackedNM``: a 2-D weight in compressed N:M form (layout v2), registered as a pytree."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.kernels._common import FLOAT_DTYPES, MetaLayout, check_nm


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedNM:
    """An N:M-sparse ``(K, N)`` weight ``W`` stored as value planes plus index planes.

    The layout streams: every plane is output-major ``(N, ...)`` with the groups of the
    contracting axis contiguous, so a kernel tile of output units by groups is one
    rectangular copy from each plane, and the expansion to dense is elementwise on
    equally shaped tiles (:class:`~jaxcompress.kernels.MetaLayout`).

    Pytree children: ``values`` and ``meta``; static aux data: ``shape``, ``n``, ``m``,
    ``stride`` (so ``jit``, ``grad``, Orbax and shardings see two arrays).

    Attributes:
      values: ``(n, N, K/m)``; ``values[t, j, g]`` is the ``t``-th kept entry (in increasing
        index order) of group ``g`` (rows ``g*m .. g*m+m-1`` of ``W``) of column ``j``.
      meta: ``(n, N, words)`` unsigned words of ``values``' bit width holding the in-group
        indices, bit layout in :class:`~jaxcompress.kernels.MetaLayout`.
      shape: ``(K, N)`` of the dense weight; ``K`` is the contracting axis.
      n, m: the pattern (``n`` kept per group of ``m``).
      stride: interleave stride of the index fields (``MetaLayout.stride(K/m)``).

    Bytes (:attr:`nbytes`): ``K*N*n/m*itemsize`` of values plus ``n*N*words*itemsize`` of
    words, ``K*N*n/m*bits/8`` when ``K/m`` is a multiple of ``per_word``: for bf16 2:4,
    36 bits per 4 weights instead of 64 (9/16 of dense, a 1.78x bandwidth ceiling).
    Conv or stacked weights are packed after a reshape to 2-D, see
    :func:`jaxcompress.kernels.pack_nm`.
    """

    values: jax.Array
    meta: jax.Array
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
    n: int = dataclasses.field(metadata=dict(static=True))
    m: int = dataclasses.field(metadata=dict(static=True))
    stride: int = dataclasses.field(metadata=dict(static=True))

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def layout(self) -> MetaLayout:
        return MetaLayout(self.n, self.m, np.dtype(self.values.dtype).itemsize)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed form (values + index words)."""
        return int(
            self.values.size * np.dtype(self.values.dtype).itemsize
            + self.meta.size * np.dtype(self.meta.dtype).itemsize
        )

    def astype(self, dtype) -> PackedNM:
        """The same weight with values cast to ``dtype``; the index words are re-laid out
        when the value width changes (words share the values' bit width)."""
        from jaxcompress.kernels._nm_pack.reference import pack_fields, unpack_fields

        dtype = jnp.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        values = self.values.astype(dtype)
        if dtype.itemsize == np.dtype(self.values.dtype).itemsize:
            return dataclasses.replace(self, values=values)
        groups = self.shape[0] // self.m
        new = MetaLayout(self.n, self.m, dtype.itemsize)
        stride = new.stride(groups)
        idx = unpack_fields(self.meta, groups, self.layout, self.stride)
        meta = pack_fields(idx, new, stride)
        return dataclasses.replace(self, values=values, meta=meta, stride=stride)

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
    dtype = jnp.dtype(packed.values.dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}.values must be float32, bfloat16 or float16, got {dtype}")
    layout = MetaLayout(n, m, dtype.itemsize)
    groups = k // m
    if packed.stride != layout.stride(groups):
        raise ValueError(
            f"{name}.stride={packed.stride!r} does not match the layout of shape={shape}, "
            f"{n}:{m}, {dtype} (expected {layout.stride(groups)}); repack with pack_nm"
        )
    want_values = (n, cols, groups)
    want_meta = (n, cols, layout.words(groups, packed.stride))
    if tuple(packed.values.shape) != want_values:
        raise ValueError(
            f"{name}.values must have shape {want_values} for shape={shape}, {n}:{m}; got "
            f"{tuple(packed.values.shape)}"
        )
    word = jnp.dtype(layout.word_dtype)
    if tuple(packed.meta.shape) != want_meta or jnp.dtype(packed.meta.dtype) != word:
        raise ValueError(
            f"{name}.meta must be {word.name}{want_meta} for shape={shape}, {n}:{m}, "
            f"{dtype}; got {packed.meta.dtype}{tuple(packed.meta.shape)}"
        )
    return packed
