"""Bit-level gates: gated residual quantization of any model's kernels, and its bit-MAC cost.

A gate per residual quantization level of a kernel, so that the active gates are its
bit-width: the residual-level gating of van Baalen et al., "Bayesian Bits: Unifying
Quantization and Pruning", NeurIPS 2020 (arXiv:2005.07093), trained with the l1/l2 surrogate of
Nasery et al., CVPRW 2024 (arXiv:2306.05785), as the bit-level gates of that paper's method.

With :math:`S = \\max_i |w_i|` and steps :math:`s_k = S / 2^{k-1}` (``k = 1..K``), the
round-to-nearest quantizer :math:`q_m(w) = s_m \\operatorname{round}(w / s_m)` telescopes into
ternary residual planes (since :math:`s_{k-1} = 2 s_k`):

.. math::  q_m(w) = \\sum_{k \\le m} s_k c_k(w),\\qquad
           c_k = \\operatorname{round}(w/s_k) - 2 \\operatorname{round}(w/s_{k-1})
           \\in \\{-1, 0, 1\\},\\quad c_1 = \\operatorname{round}(w/S),

and the gated kernel is

.. math::  W(\\alpha) = \\sum_{k=1}^{K} \\alpha_k s_k c_k(\\bar w)
           + \\alpha_1 (w - \\bar w),\\qquad \\bar w = \\operatorname{stop\\_gradient}(w),

so all gates 1 give :math:`q_K(w)`, keeping the first ``m`` levels (the others 0) gives
:math:`q_m(w)`, and the latent kernel ``w`` gets the straight-through gradient
:math:`\\partial W / \\partial w = \\alpha_1` (the last term is exactly 0 in value).
Training keeps the gates non-increasing in ``k`` (``project_nonnegative``), so the kept levels
are a prefix and the number of active gates is the bit-width.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcompress.latency._cost import first_example
from jaxcompress.structure import Gate, Gated, MacCount
from jaxcompress.structure._gates import _swapped, _variable
from jaxcompress.structure._groups import analyse
from jaxcompress.structure._macs import mac_count
from jaxcompress.structure._trace import Path

MAX_LEVELS = 16
SUFFIX = ":bits"


def check_levels(levels: Any) -> int:
    if isinstance(levels, bool) or not isinstance(levels, numbers.Integral):
        raise ValueError(f"levels must be an int in [1, {MAX_LEVELS}], got {levels!r}")
    if not 1 <= int(levels) <= MAX_LEVELS:
        raise ValueError(f"levels must be an int in [1, {MAX_LEVELS}], got {levels!r}")
    return int(levels)


def _check_init(init: Any, levels: int) -> np.ndarray:
    if isinstance(init, numbers.Real) and not isinstance(init, bool):
        values = np.full((levels,), float(init))
    elif isinstance(init, (Sequence, np.ndarray, jax.Array)) and not isinstance(init, str):
        values = np.asarray(init, np.float64)
        if values.shape != (levels,):
            raise ValueError(
                f"init must be a float or {levels} values (one per level), got shape {values.shape}"
            )
    else:
        raise ValueError(f"init must be a non-negative float or a sequence of them, got {init!r}")
    if not np.all(np.isfinite(values)) or (values < 0).any():
        raise ValueError(f"init must be finite and non-negative, got {init!r}")
    return values


def gate_name(path: Path) -> str:
    """``"<kernel path>:bits"``: the bit-gate name of the kernel at ``path`` (group names never
    hold ``:``)."""
    return "/".join(str(p) for p in path) + SUFFIX


def quantized_kernel(w: jax.Array, gates: jax.Array) -> jax.Array:
    """:math:`W(\\alpha)` of the module docstring for the latent kernel ``w`` and level gates
    ``gates`` (shape ``(K,)``), summed from the coarsest level up."""
    levels = int(gates.shape[0])
    a = gates.astype(w.dtype)
    bar = jax.lax.stop_gradient(w)
    scale = jnp.maximum(jnp.max(jnp.abs(bar)), jnp.finfo(w.dtype).tiny)
    coarser = jnp.zeros_like(bar)
    out = jnp.zeros_like(bar)
    for k in range(levels):  # fixed summation order (extraction folds the same sum)
        step = scale / (2.0**k)
        rounded = jnp.round(bar / step)
        out = out + (step * (rounded - 2.0 * coarser)) * a[k]
        coarser = rounded
    return out + a[0] * (w - bar)


def bits_of(gates: np.ndarray, tau: float) -> int:
    """Kept bit-width: the 1-based index of the last level with ``gate >= tau * max`` and
    ``gate > 0`` (at least 1)."""
    keep = (gates >= tau * gates.max()) & (gates > 0)
    idx = np.flatnonzero(keep)
    return int(idx[-1]) + 1 if idx.size else 1


class Quantized(nnx.Module):
    """A model whose chosen kernels are gated residual quantizations (bit-level gates).

    ``quantized(*x)`` temporarily replaces every quantized kernel ``w`` of the (inner) model
    by :math:`W(\\alpha)` (see :mod:`jaxcompress.latency`; all gates 1 give the ``levels``-level
    round-to-nearest quantizer), runs the model's own code and restores ``w``, inside whatever
    trace is active (``nnx.jit``, ``nnx.grad``): no module is rewritten. When ``model`` is a
    :class:`jaxcompress.structure.Gated`, the kernels of its inner model are quantized and the
    channel gates then multiply the quantized kernels, so both gate families train together.
    Build with :func:`quantize`.

    Attributes:
      model: the wrapped model (plain or ``Gated``).
      gates: ``nnx.Dict`` of bit-gate name ``"<kernel path>:bits"`` -> :class:`Gate` of shape
        ``(levels,)``; :func:`surrogate_penalty`, :func:`project_nonnegative` and
        :func:`gate_diagnostics` treat them as groups of ``levels`` units.
      levels: the number of quantization levels ``K``.
      kernels: ``{bit-gate name: kernel path}`` (paths in the inner, ungated model).
      macs: the bit-weighted :class:`jaxcompress.structure.MacCount` per example.
    """

    def __init__(
        self,
        model: nnx.Module,
        kernels: Sequence[Path],
        levels: int,
        terms: Mapping[tuple[str, ...], int],
        sizes: Mapping[str, int],
        *,
        init: np.ndarray,
    ):
        self.model = model
        self.levels = int(levels)
        self._kernels = tuple((gate_name(p), tuple(p)) for p in kernels)
        self.gates = nnx.Dict(
            {name: Gate(jnp.asarray(init, jnp.float32)) for name, _ in self._kernels}
        )
        self._terms = tuple(terms.items())
        self._sizes = tuple(sizes.items())

    @property
    def kernels(self) -> dict[str, Path]:
        return dict(self._kernels)

    @property
    def macs(self) -> MacCount:
        """Bit-weighted multiply-adds per example: every ``dot_general``/convolution's MAC
        polynomial times the bit-width of the quantized kernel it reads (the bit group
        ``"<kernel path>:bits"``, a count in ``[0, levels]``), or times ``levels`` when it reads
        none. ``macs.dense = levels * MACs``; the sizes hold the channel groups of the inner
        model (when it is ``Gated``, the plain model's prunable groups) and every bit group.
        ``ops`` is empty (bit-widths change no shape)."""
        return MacCount(dict(self._terms), dict(self._sizes))

    def inner(self) -> nnx.Module:
        """The plain model whose kernels are quantized."""
        return self.model.model if isinstance(self.model, Gated) else self.model

    def _quantized(self) -> list[tuple[nnx.Variable, jax.Array]]:
        inner = self.inner()
        out = []
        for name, path in self._kernels:
            var = _variable(inner, path)
            out.append((var, quantized_kernel(var[...], self.gates[name][...])))
        return out

    def __call__(self, *inputs, **kwargs):
        with _swapped(self._quantized()):
            return self.model(*inputs, **kwargs)


def _weighted(op_macs: Mapping[tuple[str, ...], int], bits: str | None, levels: int):
    if bits is None:
        return {k: c * levels for k, c in op_macs.items()}
    return {tuple(sorted((*k, bits))): c for k, c in op_macs.items()}


def plain_macs(model: nnx.Module, inputs: Sequence[Any]) -> MacCount:
    """The MAC polynomial of ``model`` per example (first example of ``inputs``)."""
    return mac_count(analyse(model, first_example(inputs)))


def bit_cost(
    base: MacCount, levels: int, names: Mapping[Path, Any]
) -> tuple[dict[tuple[str, ...], int], dict[str, int]]:
    """``(terms, sizes)`` of the bit-weighted MAC polynomial from the plain one ``base``, with
    ``names[path]`` the bit factor of an op reading the kernel at ``path`` (a group name, or
    an int bit-width); other ops count at ``levels`` bits."""
    terms: dict[tuple[str, ...], int] = {}
    sizes = dict(base.sizes)
    for op in base.ops:
        path = next((p for p in op.variables if p is not None and p in names), None)
        factor = None if path is None else names[path]
        if isinstance(factor, str):
            sizes[factor] = levels
            poly = _weighted(op.macs, factor, levels)
        else:
            poly = _weighted(op.macs, None, levels if factor is None else int(factor))
        for k, c in poly.items():
            terms[k] = terms.get(k, 0) + c
    return {k: c for k, c in terms.items() if c}, sizes


def quantize(
    model: nnx.Module,
    *inputs: Any,
    levels: int = 8,
    select: Callable[[Path, nnx.Variable], bool] | None = None,
    init: float | Sequence[float] | np.ndarray = 1.0,
) -> Quantized:
    """``model`` with a gate per residual quantization level on every chosen kernel.

    The kernels offered are the model variables that a ``dot_general`` or convolution of the
    traced forward pass reads (directly or through layout ops such as a transpose, reshape or
    dtype conversion). Each gets ``levels`` non-negative gates, :math:`\\alpha_1..\\alpha_K`;
    the forward pass uses the gated kernel :math:`W(\\alpha)` (module docstring of
    :mod:`jaxcompress.latency`), so at ``init = 1`` the model computes its function with every
    chosen kernel quantized to ``levels`` levels, and zeroing the gates after level ``m``
    quantizes it to ``m`` levels. The cost :attr:`Quantized.macs` weights every op's MACs by
    the bit-width of the kernel it reads; with :func:`surrogate_penalty` the relaxed count
    :math:`r(\\alpha)` of a kernel's gates plays its bit-width. :func:`extract` keeps, per
    kernel, the levels up to the last gate at or above ``tau`` times its largest.

    ``quantize(gated(model, x), x)`` quantizes the kernels of the inner model under the channel
    gates (both kinds of gates then train together, and ``macs`` is polynomial in both).

    Args:
      model: any ``flax.nnx.Module``, or a :class:`jaxcompress.structure.Gated` of one.
      *inputs: example inputs of ``model(*inputs)`` (costs are per example: the first one
        along the leading axis).
      levels: residual levels ``K`` per kernel, an int in ``[1, 16]``.
      select: ``select(path, variable) -> bool`` over the offered kernels (``path`` a tuple of
        keys in the ungated model). Default: every floating-point ``nnx.Param`` offered.
      init: initial gate value (>= 0), or ``levels`` values, one per level. The l1/l2 ratio
        has no gradient at equal gates; a start decreasing in the level (e.g.
        ``np.linspace(1.0, 0.9, levels)``) makes it remove the finest levels first.

    Training: keep the gates non-negative with :func:`project_nonnegative`, which also keeps
    each kernel's bit gates non-increasing in the level (a level is on only while every
    coarser one is), so the active gates are the bit-width :func:`extract` keeps.

    Raises:
      TypeError: ``model`` is not an NNX module or is already ``Quantized``; ``select`` is not
        callable.
      ValueError: a bad ``levels`` or ``init``; no inputs; the forward pass cannot be traced
        (or holds control flow); no kernel selected.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    if isinstance(model, Quantized):
        raise TypeError("model is already Quantized: quantize its inner model once")
    levels = check_levels(levels)
    if select is not None and not callable(select):
        raise TypeError(f"select must be callable (path, variable) -> bool or None, got {select!r}")
    init_values = _check_init(init, levels)
    if not inputs:
        raise ValueError("inputs must hold at least one example input of the model, got none")
    inner = model.model if isinstance(model, Gated) else model
    base = plain_macs(inner, inputs)
    offered: list[Path] = []
    for op in base.ops:
        for p in op.variables:
            if p is not None and p not in offered:
                offered.append(p)
    chosen = []
    for path in offered:
        var = _variable(inner, path)
        floating = jnp.issubdtype(jnp.asarray(var[...]).dtype, jnp.floating)
        if select is None:
            ok = floating and isinstance(var, nnx.Param) and not isinstance(var, Gate)
        else:
            ok = bool(select(path, var))
            if ok and not floating:
                raise ValueError(f"select chose {path}, which is not floating point")
        if ok:
            chosen.append(path)
    if not chosen:
        raise ValueError(
            f"quantize: no kernel of {type(inner).__name__} selected; the variables that a "
            f"dot_general or convolution reads are {offered}"
        )
    terms, sizes = bit_cost(base, levels, {p: gate_name(p) for p in chosen})
    return Quantized(model, chosen, levels, terms, sizes, init=init_values)
