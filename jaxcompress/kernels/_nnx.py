"""Flax NNX inference conversion: N:M-sparse ``nnx.Linear`` / 1x1 ``nnx.Conv`` -> packed.

This is the only module of :mod:`jaxcompress.kernels` that imports Flax; ``jaxcompress.kernels``
re-exports its public names lazily, on first access.

:func:`sparsify_for_inference` walks a trained model whose dense kernels satisfy the N:M
pattern along their ``in`` axis (e.g. after ``jaxcompress.masks.nm`` + masked training) and
replaces each ``nnx.Linear`` by an :class:`NMLinear` and each 1x1 ``nnx.Conv`` by an
:class:`NMConv1x1`, which hold the weight as :class:`~jaxcompress.kernels.PackedNM`
(``values`` as ``nnx.Param``, index words as :class:`NMMeta`) and compute with
:func:`~jaxcompress.kernels.nm_linear` (Mosaic GPU kernel where it is measured faster, dense
otherwise) or with a fixed ``implementation``. The converted state is plain arrays, so
``orbax.checkpoint.StandardCheckpointer`` saves and restores ``nnx.state(model)`` directly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcompress.kernels._common import check_nm
from jaxcompress.kernels._dispatch import nm_linear, select_implementation
from jaxcompress.kernels._nm_mask.api import nm_violations
from jaxcompress.kernels._nm_matmul.api import nm_matmul
from jaxcompress.kernels._nm_pack.api import pack_nm
from jaxcompress.kernels._nm_pack.format import PackedNM

__all__ = [
    "LayerReport",
    "NMConv1x1",
    "NMLinear",
    "NMMeta",
    "SparsifyReport",
    "sparsify_for_inference",
]


class NMMeta(nnx.Variable):
    """Packed N:M index words (:class:`~jaxcompress.kernels.PackedNM` ``meta``, unsigned words
    of the values' width): state, but not a trainable parameter."""


def _leaf_nbytes(x) -> int:
    """Bytes of an array or ``ShapeDtypeStruct``; a PRNG key array counts its key data."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = jax.eval_shape(jax.random.key_data, x)
        return int(math.prod(data.shape) * np.dtype(data.dtype).itemsize)
    return int(math.prod(x.shape) * np.dtype(x.dtype).itemsize)


class NMLinear(nnx.Module):
    """``y = x @ W + b`` with ``W`` ``(in, out)`` stored packed (N:M along ``in``).

    Mirrors ``nnx.Linear``: ``dtype`` is the computation dtype (``None`` = promote input and
    parameters, like ``nnx.Linear``); ``x`` and the values are cast to it, the product
    accumulates in float32 and the output has that dtype.

    Args:
      packed: the weight, ``shape == (in_features, out_features)``.
      bias: ``(out_features,)`` or ``None``.
      dtype: computation dtype or ``None``.
      implementation: ``None`` = :func:`~jaxcompress.kernels.nm_linear` (measured policy:
        kernel or dense per shape); or ``'xla'``/``'mosaic'``/``'interpret'`` for
        :func:`~jaxcompress.kernels.nm_matmul`.
    """

    def __init__(
        self,
        packed: PackedNM,
        bias: jax.Array | None = None,
        *,
        dtype: Any = None,
        implementation: str | None = None,
    ):
        if not isinstance(packed, PackedNM):
            raise TypeError(f"packed must be a PackedNM, got {type(packed).__name__}")
        self.in_features, self.out_features = packed.shape
        self.n, self.m, self.stride = packed.n, packed.m, packed.stride
        self.values = nnx.Param(packed.values)
        self.meta = NMMeta(packed.meta)
        self.bias = None if bias is None else nnx.Param(bias)
        self.dtype = dtype
        self.implementation = implementation

    @property
    def packed(self) -> PackedNM:
        return PackedNM(
            values=self.values[...],
            meta=self.meta[...],
            shape=(self.in_features, self.out_features),
            n=self.n,
            m=self.m,
            stride=self.stride,
        )

    def _apply(self, x: jax.Array) -> jax.Array:
        packed = self.packed
        bias = None if self.bias is None else self.bias[...]
        dtype = self.dtype
        if dtype is None:
            dtype = jnp.result_type(x, packed.values, *(() if bias is None else (bias,)))
        x = x.astype(dtype)
        if packed.values.dtype != dtype:
            packed = packed.astype(dtype)
        if self.implementation is None:
            return nm_linear(x, packed, None if bias is None else bias.astype(dtype))
        y = nm_matmul(x, packed, implementation=self.implementation)
        return y if bias is None else y + bias.astype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._apply(x)


class NMConv1x1(NMLinear):
    """A 1x1 ``nnx.Conv`` (any number of spatial dims) with its kernel stored packed.

    A 1x1 convolution is a matmul over the channel axis after striding the spatial axes:
    ``y[..., i, j, :] = x[..., s_0 i, s_1 j, :] @ W + b``. Only convolutions where that holds
    are converted (``feature_group_count == 1``, ``input_dilation == 1``, padding
    ``'SAME'``/``'VALID'``/zero, no ``mask``).
    """

    def __init__(
        self,
        packed: PackedNM,
        bias: jax.Array | None = None,
        *,
        strides: tuple[int, ...],
        dtype: Any = None,
        implementation: str | None = None,
    ):
        super().__init__(packed, bias, dtype=dtype, implementation=implementation)
        self.strides = tuple(int(s) for s in strides)

    def __call__(self, x: jax.Array) -> jax.Array:
        nsp = len(self.strides)
        if x.ndim < nsp + 1:
            raise ValueError(
                f"x must have at least {nsp + 1} dims (spatial..., features), got {x.shape}"
            )
        if any(s != 1 for s in self.strides):
            index = (Ellipsis, *(slice(None, None, s) for s in self.strides), slice(None))
            x = x[index]
        return self._apply(x)


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """One candidate layer: where it is, what happened, and its weight bytes."""

    path: str
    kind: str
    shape: tuple[int, ...]
    status: str  # 'packed', 'kept dense: <reason>' or 'skipped: <reason>'
    dense_bytes: int
    packed_bytes: int


@dataclasses.dataclass(frozen=True)
class SparsifyReport:
    """Size report of :func:`sparsify_for_inference`.

    ``dense_bytes``/``packed_bytes`` cover the converted kernels only (dense kernel vs values
    + index words); ``model_bytes_before``/``after`` cover every array in ``nnx.state``.
    """

    n: int
    m: int
    layers: tuple[LayerReport, ...]
    model_bytes_before: int
    model_bytes_after: int

    @property
    def dense_bytes(self) -> int:
        return sum(r.dense_bytes for r in self.layers if r.status == "packed")

    @property
    def packed_bytes(self) -> int:
        return sum(r.packed_bytes for r in self.layers if r.status == "packed")

    @property
    def compression(self) -> float:
        """Dense / packed bytes of the converted kernels."""
        return self.dense_bytes / self.packed_bytes if self.packed_bytes else 1.0

    def __str__(self) -> str:
        lines = [f"{self.n}:{self.m} inference conversion"]
        width = max([len(r.path) for r in self.layers] + [5])
        lines.append(f"{'layer':<{width}}  {'kind':<9} {'dense B':>12} {'packed B':>12}  status")
        for r in self.layers:
            lines.append(
                f"{r.path:<{width}}  {r.kind:<9} {r.dense_bytes:>12,} {r.packed_bytes:>12,}  "
                f"{r.status}"
            )
        lines.append(
            f"converted kernels: {self.dense_bytes:,} B dense -> {self.packed_bytes:,} B packed "
            f"({self.compression:.2f}x); whole model: {self.model_bytes_before:,} B -> "
            f"{self.model_bytes_after:,} B"
        )
        return "\n".join(lines)


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path) or "<root>"


def _state_nbytes(model: nnx.Module) -> int:
    return sum(_leaf_nbytes(x) for x in jax.tree.leaves(nnx.state(model)) if hasattr(x, "shape"))


def _conv_skip_reason(conv: nnx.Conv) -> str | None:
    if any(k != 1 for k in conv.kernel_size):
        return f"kernel_size {tuple(conv.kernel_size)} is not 1x1"
    if conv.feature_group_count != 1:
        return f"feature_group_count={conv.feature_group_count}"
    dil = conv.input_dilation
    if dil is not None and (dil if isinstance(dil, int) else max(dil)) != 1:
        return f"input_dilation={dil}"
    pad = conv.padding
    zero = pad in ("SAME", "VALID") or (isinstance(pad, int) and pad == 0)
    if not zero and not isinstance(pad, str):
        flat = np.asarray(pad).reshape(-1) if not isinstance(pad, int) else np.asarray([pad])
        zero = bool(np.all(flat == 0))
    if not zero:
        return f"padding={pad!r}"
    if conv.mask is not None:
        return "has a kernel mask"
    return None


def _strides(conv: nnx.Conv) -> tuple[int, ...]:
    s = conv.strides
    nsp = len(conv.kernel_size)
    if s is None:
        return (1,) * nsp
    if isinstance(s, int):
        return (s,) * nsp
    return tuple(s)


def _set_child(root: nnx.Module, path: tuple, child: nnx.Module) -> None:
    parent: Any = root  # an nnx.Module, or an nnx.List / Sequential indexed by int
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    key = path[-1]
    if isinstance(key, int):
        parent[key] = child
    else:
        setattr(parent, key, child)


def sparsify_for_inference(
    model: nnx.Module,
    *,
    n: int = 2,
    m: int = 4,
    where: Callable[[str, nnx.Module], bool] | None = None,
    strict: bool = True,
    implementation: str | None = None,
    batch: int | None = None,
    device: jax.Device | None = None,
) -> tuple[nnx.Module, SparsifyReport]:
    """Converts the N:M-sparse ``nnx.Linear`` and 1x1 ``nnx.Conv`` layers of ``model`` into
    packed :class:`NMLinear` / :class:`NMConv1x1` layers for inference.

    The input model is not modified (the conversion works on ``nnx.clone(model)``). Each
    converted kernel ``W`` ``(in, out)`` (1x1 conv: ``(1, 1, in, out)`` reshaped) is stored as
    ``pack_nm(W, n, m)``: for bf16 2:4 that is 9/16 of the dense bytes. Outputs equal the
    dense model's up to float32-accumulation order (the dense model computes the same
    products).

    Args:
      model: an NNX module (the root may itself be a Linear).
      n, m: the pattern the kernels satisfy along ``in``.
      where: optional ``(path, layer) -> bool``; only selected candidates are converted
        (e.g. ``lambda p, l: not p.endswith('head')``). ``path`` is ``'layers/0'`` style.
      strict: if ``True`` (default) a selected layer that cannot be packed (not N:M,
        ``in % m != 0``, unsupported conv) raises ``ValueError`` naming it; if ``False`` it
        stays dense and the report says why.
      implementation: passed to the new layers (``None``: measured dispatch via
        :func:`~jaxcompress.kernels.nm_linear`).
      batch: the rows per call the model will serve (the decode batch; for a 1x1 conv,
        batch x output pixels). When given, a layer is converted only where
        :func:`~jaxcompress.kernels.select_implementation` picks the kernel for its shape and
        compute dtype on ``device`` at that batch; the others keep their dense kernel and
        the report says ``'kept dense: ...'``. ``None`` (default) converts every candidate:
        the packed weights take 9/16 of the bytes (bf16 2:4), but a layer whose dispatch is
        dense unpacks its weight at every call, which on a CPU or an unmeasured GPU makes it
        slower than the dense model (``experiments/benchmarks/lm_decode.py`` measures both).
        Not allowed together with ``implementation``.
      device: where the model will run, for ``batch`` (default ``jax.devices()[0]``).

    Returns:
      ``(sparse_model, report)``: the converted model and a :class:`SparsifyReport`.

    Under ``nnx.eval_shape`` (abstract weights) the N:M check is skipped, which lets
    ``nnx.eval_shape(lambda: sparsify_for_inference(make_model())[0])`` build the abstract
    target for restoring a saved packed model.
    """
    n, m = check_nm(n, m)
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
    if where is not None and not callable(where):
        raise TypeError(f"where must be callable (path, layer) -> bool, got {where!r}")
    if batch is not None:
        if isinstance(batch, bool) or not isinstance(batch, int | np.integer) or batch < 1:
            raise ValueError(f"batch must be an int >= 1 or None, got batch={batch!r}")
        if implementation is not None:
            raise ValueError(
                f"batch={batch} chooses layers by the measured dispatch, which a fixed "
                f"implementation={implementation!r} overrides: pass one of them"
            )
        device = jax.devices()[0] if device is None else device
    elif device is not None:
        raise ValueError("device= is only used with batch=: pass the batch the model will serve")
    before = _state_nbytes(model)
    new = nnx.clone(model)
    candidates = [
        (path, node)
        for path, node in nnx.iter_graph(new)
        if isinstance(node, nnx.Linear | nnx.Conv) and not isinstance(node, NMLinear)
    ]
    reports: list[LayerReport] = []
    replacements: list[tuple[tuple, nnx.Module]] = []
    for path, layer in candidates:
        name = _path_str(path)
        if where is not None and not where(name, layer):
            continue
        kernel = layer.kernel[...]
        kind = "Linear" if isinstance(layer, nnx.Linear) else "Conv1x1"
        dense_bytes = _leaf_nbytes(kernel)
        reason = _conv_skip_reason(layer) if isinstance(layer, nnx.Conv) else None
        w2d = kernel if reason is not None else kernel.reshape(kernel.shape[-2:])
        if reason is None and w2d.shape[0] % m:
            reason = f"in_features={w2d.shape[0]} is not divisible by m={m}"
        if reason is None and not isinstance(w2d, jax.core.Tracer):
            bad = int(nm_violations(w2d, n, m))
            if bad:
                total = w2d.shape[0] // m * w2d.shape[1]
                reason = f"not {n}:{m}: {bad} of {total} groups have more than {n} nonzeros"
        if reason is not None:
            if strict:
                raise ValueError(
                    f"model: layer {name!r} ({kind}, kernel {tuple(kernel.shape)}) cannot be "
                    f"packed: {reason}; pass where= to exclude it or strict=False to keep it dense"
                )
            reports.append(
                LayerReport(name, kind, tuple(kernel.shape), f"skipped: {reason}", dense_bytes, 0)
            )
            continue
        if layer.dtype is not None and jnp.dtype(layer.dtype) != w2d.dtype:
            w2d = w2d.astype(layer.dtype)  # what the layer computes with: same outputs
        if batch is not None:
            shape2d = (int(w2d.shape[0]), int(w2d.shape[1]))
            choice = select_implementation(batch, shape2d, w2d.dtype, device, n=n, m=m)
            if choice != "mosaic":
                device_kind = getattr(device, "device_kind", str(device))
                status = (
                    f"kept dense: the policy picks dense jnp.dot for {shape2d[0]}x{shape2d[1]} "
                    f"{w2d.dtype} at batch {batch} on {device_kind!r}"
                )
                reports.append(LayerReport(name, kind, tuple(kernel.shape), status, dense_bytes, 0))
                continue
        packed = pack_nm(w2d, n, m)
        bias = None if layer.bias is None else layer.bias[...]
        if isinstance(layer, nnx.Conv):
            new_layer = NMConv1x1(
                packed,
                bias,
                strides=_strides(layer),
                dtype=layer.dtype,
                implementation=implementation,
            )
        else:
            new_layer = NMLinear(packed, bias, dtype=layer.dtype, implementation=implementation)
        replacements.append((path, new_layer))
        reports.append(
            LayerReport(name, kind, tuple(kernel.shape), "packed", dense_bytes, packed.nbytes)
        )
    for path, new_layer in replacements:
        if path == ():
            new = new_layer
        else:
            _set_child(new, path, new_layer)
    report = SparsifyReport(n, m, tuple(reports), before, _state_nbytes(new))
    return new, report
