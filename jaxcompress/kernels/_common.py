"""Shared validation, metadata layout and backend selection for the N:M kernels.

Everything here is static (Python ints, strings, dtypes): it runs once per trace and never
touches traced values.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

try:  # Pallas is public as jax.pallas in newer JAX; jax 0.10 has only jax.experimental.pallas.
    from jax import pallas as pl  # pyrefly: ignore[missing-module-attribute]
except ImportError:
    from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton  # Triton's API stays here in both.

from jaxcompress import _checks
from jaxcompress.masks._magnitude import magnitude_keys
from jaxcompress.masks._nm import magnitude_ranks

__all__ = [
    "IMPLEMENTATIONS",
    "MAX_M",
    "META_DTYPE",
    "MetaLayout",
    "check_array",
    "check_nm",
    "is_gpu_backend",
    "largest_pow2_divisor",
    "magnitude_keys",
    "magnitude_ranks",
    "next_power_of_2",
    "phase_fields",
    "pl",
    "load_words",
    "resolve_implementation",
    "triton_compiler_params",
]

IMPLEMENTATIONS = ("xla", "pallas", "interpret")
"""Valid values of every ``implementation=`` argument (``None`` picks by platform)."""

MAX_M = 16
"""Largest group size the kernels support (indices fit a 4-bit field)."""

META_DTYPE = jnp.uint8
"""Storage type of the packed index words."""

_GPU_BACKENDS = ("gpu", "cuda", "rocm")


def check_nm(n: Any, m: Any) -> tuple[int, int]:
    """Validates an N:M pattern for the kernels: ``1 <= n < m <= MAX_M``; returns ints.

    The rule ``1 <= n < m`` is :func:`jaxcompress._checks.check_nm` (shared with
    :func:`jaxcompress.masks.nm` and the CrAM/AC-DC compressors); the kernels add
    ``m <= MAX_M`` because an in-group index must fit a 4-bit metadata field.
    """
    n, m = _checks.check_nm(n, m)
    if m > MAX_M:
        raise ValueError(
            f"m must be a group size <= {MAX_M} for the N:M kernels (an index fits a "
            f"4-bit field), got m={m}; jaxcompress.masks.nm has no such limit"
        )
    return n, m


def check_array(name: str, value: Any, *, ndim: int | None = None, min_ndim: int = 0) -> jax.Array:
    """Checks ``value`` is a real floating array of the requested rank."""
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(value).__name__}")
    dtype = jnp.dtype(value.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must be a real floating-point array, got dtype {dtype}")
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{name} must have ndim == {ndim}, got shape {tuple(value.shape)}")
    if value.ndim < min_ndim:
        raise ValueError(f"{name} must have ndim >= {min_ndim}, got shape {tuple(value.shape)}")
    return value


def is_gpu_backend() -> bool:
    """Whether JAX's default backend is a GPU (CUDA or ROCm)."""
    return jax.default_backend() in _GPU_BACKENDS


def resolve_implementation(implementation: str | None) -> str:
    """Maps ``implementation=`` to one of :data:`IMPLEMENTATIONS`.

    ``None`` picks ``'pallas'`` on a GPU backend and ``'xla'`` elsewhere. ``'pallas'`` on a
    platform without the Pallas Triton backend is an error (use ``'interpret'`` to run the
    same kernel through the Pallas interpreter, or ``'xla'`` for the reference).
    """
    if implementation is None:
        return "pallas" if is_gpu_backend() else "xla"
    if not isinstance(implementation, str) or implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}"
        )
    if implementation == "pallas" and not is_gpu_backend():
        raise ValueError(
            "implementation='pallas' needs a GPU (Pallas Triton backend), but the default JAX "
            f"backend is {jax.default_backend()!r}; use implementation='xla' (reference) or "
            "'interpret' (the Pallas kernel in interpret mode)"
        )
    return implementation


def triton_compiler_params(*, num_warps: int = 4, num_stages: int = 3):
    """Pallas Triton compiler params (selects the Triton backend, not Mosaic GPU).

    ``CompilerParams`` in jax >= 0.7; older releases called it ``TritonCompilerParams``.
    """
    params = getattr(pltriton, "CompilerParams", None)
    if params is None:  # jax < 0.7; the installed jax's stubs lack the old name.
        params = pltriton.TritonCompilerParams  # pyrefly: ignore[missing-attribute]
    return params(num_warps=num_warps, num_stages=num_stages)


def next_power_of_2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def largest_pow2_divisor(x: int, cap: int) -> int:
    """Largest power of two ``p <= cap`` with ``x % p == 0`` (``x >= 1``)."""
    p = 1
    while p * 2 <= cap and x % (p * 2) == 0:
        p *= 2
    return p


@dataclasses.dataclass(frozen=True)
class MetaLayout:
    """Bit layout of the packed index words for an N:M pattern.

    The kept entries of a ``(K, N)`` weight are stored row-major as ``values`` of shape
    ``(K*n/m, N)``: row ``r = g*n + t`` holds, for every column, the ``t``-th kept entry (in
    increasing index order) of group ``g`` (rows ``g*m .. g*m+m-1`` of the weight). Their
    in-group indices ``idx[r, j]`` in ``[0, m)`` are packed into ``uint8`` words: each index
    takes ``bits`` bits (the smallest power of two ``>= ceil(log2 m)``: 1 bit for m=2, 2 bits
    for m=3..4, 4 bits for m=5..16, so m=8 uses 4-bit fields and one bit of each field stays
    zero), ``per_word = 8 // bits`` indices share a byte, and

    ``meta[w, j] = sum_f idx[w*per_word + f, j] << (f*bits)``  for ``f < per_word``,

    i.e. little-endian fields along the contracting axis, column by column. ``meta`` has
    ``ceil(K*n/m / per_word)`` rows; unused fields of the last row are zero. For 2:4 that is
    4 bits per group of 4 weights (two 2-bit indices), the format of the 2:4 sparse tensor
    cores.

    The kernels walk the rows in *periods* of ``period_rows = lcm(n, per_word)`` value rows,
    which span ``period_words`` meta rows, ``period_groups`` groups and ``period_dense``
    weight rows, so every period starts at a word boundary.
    """

    n: int
    m: int

    @property
    def bits(self) -> int:
        need = max(1, math.ceil(math.log2(self.m)))
        return next_power_of_2(need)

    @property
    def per_word(self) -> int:
        return 8 // self.bits

    @property
    def field_mask(self) -> int:
        return (1 << self.bits) - 1

    @property
    def period_rows(self) -> int:
        return math.lcm(self.n, self.per_word)

    @property
    def period_words(self) -> int:
        return self.period_rows // self.per_word

    @property
    def period_groups(self) -> int:
        return self.period_rows // self.n

    @property
    def period_dense(self) -> int:
        return self.period_groups * self.m

    def value_rows(self, k: int) -> int:
        return k // self.m * self.n

    def meta_rows(self, k: int) -> int:
        return -(-self.value_rows(k) // self.per_word)


def load_words(meta_ref: Any, first: Any, rows: int, layout: MetaLayout) -> list[jax.Array]:
    """Inside a Pallas kernel: the ``period_words`` index words of one period as int32 tiles
    ``(rows, cols)``, word ``w`` read from rows ``first + w, first + w + period_words, ...``
    of ``meta_ref``."""
    return [
        meta_ref[pl.ds(first + w, rows, stride=layout.period_words), :].astype(jnp.int32)
        for w in range(layout.period_words)
    ]


def phase_fields(
    words: list[jax.Array], values_ref: Any, first: Any, q: int, rows: int, layout: MetaLayout
) -> tuple[list[jax.Array], list[jax.Array]]:
    """Inside a Pallas kernel: the ``n`` in-group indices and values of phase ``q``.

    Field ``f = q n + t`` (``t < n``) is bits ``(f mod per_word) * bits`` of word
    ``f // per_word``; its value is read from rows ``first + f, first + f + period_rows, ...``
    of ``values_ref``. Returns ``(indices, values)``, two lists of ``n`` tiles.
    """
    n, per, bits = layout.n, layout.per_word, layout.bits
    indices, values = [], []
    for t in range(n):
        f = q * n + t
        indices.append((words[f // per] >> ((f % per) * bits)) & layout.field_mask)
        values.append(values_ref[pl.ds(first + f, rows, stride=layout.period_rows), :])
    return indices, values
