"""Shared validation, the packed-index layout and backend selection for the N:M kernels.

Everything here is static (Python ints, strings, dtypes): it runs once per trace and never
touches traced values.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress import _checks

__all__ = [
    "FLOAT_DTYPES",
    "IMPLEMENTATIONS",
    "KERNEL_STRIDE",
    "MAX_M",
    "MetaLayout",
    "check_array",
    "check_nm",
    "is_gpu_backend",
    "is_hopper",
    "resolve_implementation",
]

IMPLEMENTATIONS = ("xla", "mosaic", "interpret")
"""Valid values of ``nm_matmul(implementation=...)`` (``None`` picks by platform)."""

MAX_M = 16
"""Largest group size the kernels support (an in-group index fits a 4-bit field)."""

MAX_STRIDE = 16
"""Largest interleave stride of the index words (see :class:`MetaLayout`)."""

KERNEL_STRIDE = 16
"""The stride the Mosaic GPU kernel reads: one index word per value in a 16-wide sub-tile,
i.e. 32-byte rows of 16-bit values (one ``wgmma`` K step)."""

FLOAT_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))
"""Value dtypes the N:M kernels take (weights and activations)."""

_GPU_BACKENDS = ("gpu", "cuda", "rocm")
_WORD_DTYPES = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


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


def is_hopper(device: jax.Device | None = None) -> bool:
    """Whether ``device`` (default: the first device) is an sm90 NVIDIA GPU (H100/H200),
    the target of the Mosaic GPU kernel (``wgmma``)."""
    device = jax.devices()[0] if device is None else device
    if device.platform not in ("gpu", "cuda"):
        return False
    return str(getattr(device, "compute_capability", "")).startswith("9.")


def resolve_implementation(implementation: str | None) -> str:
    """Maps ``implementation=`` to one of :data:`IMPLEMENTATIONS`.

    ``None`` picks ``'mosaic'`` on an sm90 GPU and ``'xla'`` elsewhere. ``'mosaic'`` on any
    other device is an error raised before any launch (use ``'interpret'`` to run the same
    kernel through the Mosaic GPU interpreter on any machine, or ``'xla'``).
    """
    if implementation is None:
        return "mosaic" if is_hopper() else "xla"
    if not isinstance(implementation, str) or implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}"
        )
    if implementation == "mosaic" and not is_hopper():
        device = jax.devices()[0]
        raise ValueError(
            "implementation='mosaic' needs an sm90 NVIDIA GPU (H100/H200: the kernel issues "
            f"wgmma), but the first device is {device.device_kind!r} on platform "
            f"{device.platform!r}; use implementation='xla' or 'interpret' (the same kernel "
            "in the Mosaic GPU interpreter)"
        )
    return implementation


@dataclasses.dataclass(frozen=True)
class MetaLayout:
    """Bit layout of the packed in-group indices ("position planes", layout v2).

    An N:M weight ``W`` ``(K, N)`` has ``G = K/m`` groups per output unit ``j`` (rows
    ``g*m .. g*m+m-1``). Slot ``t < n`` of group ``g`` is its ``t``-th kept entry in
    increasing index order; its index ``idx[t, j, g]`` in ``[0, m)`` takes ``bits`` bits
    (the smallest power of two ``>= log2 m``: 1 bit for m=2, 2 for m=3..4, 4 for m=5..16).

    Index words have the bit width of the values (``uint16`` for bf16/f16, ``uint32`` for
    f32), so that a tile of words and a tile of values of the same shape share one register
    layout in a kernel, and hold ``per_word = 8*itemsize/bits`` fields. Word ``p`` of period
    ``b`` (word column ``b*stride + p``) of plane ``t`` holds, at bits ``f*bits``, the index
    of slot ``t`` of group

    .. math:: g = b \\cdot \\mathrm{per\\_word} \\cdot \\mathrm{stride} + f \\cdot
       \\mathrm{stride} + p,\\qquad f < \\mathrm{per\\_word},\\ p < \\mathrm{stride}

    i.e. field ``f`` of a ``stride``-wide tile of words is the index of the ``f``-th
    ``stride``-wide tile of values: the expansion is elementwise on equally shaped tiles.
    ``stride`` is the largest power of two ``<= MAX_STRIDE`` with ``G`` divisible by
    ``per_word*stride``, or 1 (then the last word may be partly used; unused fields are 0).
    Bytes: ``n*bits/8`` per group of ``m`` weights (2:4: 4 bits per 4 weights, the density
    of the 2:4 sparse tensor cores' metadata).
    """

    n: int
    m: int
    itemsize: int = 2

    @property
    def bits(self) -> int:
        need = max(1, math.ceil(math.log2(self.m)))
        return 1 << (need - 1).bit_length()

    @property
    def word_dtype(self):
        return _WORD_DTYPES[self.itemsize]

    @property
    def per_word(self) -> int:
        return 8 * self.itemsize // self.bits

    @property
    def field_mask(self) -> int:
        return (1 << self.bits) - 1

    def stride(self, groups: int) -> int:
        """Interleave stride of a weight with ``groups`` groups per output unit."""
        s = MAX_STRIDE
        while s > 1 and groups % (self.per_word * s):
            s //= 2
        return s

    def words(self, groups: int, stride: int) -> int:
        """Index words per output unit and slot."""
        period = self.per_word * stride
        return -(-groups // period) * stride
