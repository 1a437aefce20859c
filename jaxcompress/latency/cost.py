"""Cost models: a static layer graph, exact multiply-add counts and a measured latency model.

Counting convention
-------------------
Costs are **multiply-adds (MACs) per example** of the matrix products and convolutions:
a ``kh x kw`` convolution from ``c_in`` to ``c_out`` channels at output size ``H_o x W_o``
costs ``kh kw H_o W_o c_in c_out``; a Dense layer on ``T`` tokens ``T d_in d_out``; attention
on ``L`` tokens with ``h`` heads of size ``d_h`` costs ``L^2 h d_h`` for ``Q K^T`` plus the same
for ``A V``. Biases, BatchNorm, activations, softmax, pooling, gates and embedding lookups are
not counted. The paper's "FLOPs" are these MACs (multiply by 2 for add+multiply FLOPs).

Layer graph
-----------
A :class:`LayerGraph` is the static description the surrogate needs (Nasery et al., 2023,
arXiv:2306.05785, spec section 4.2): a tuple of :class:`CostTerm`. A term costs

.. math::  \\text{coef} \\cdot \\prod_i \\Big(\\sum_{a \\in \\text{factor}_i} n(a)\\Big),

where an atom ``a`` is an int (a fixed size) or the name of a gate group, whose ``n(a)`` is its
active count :math:`\\|\\alpha\\|_0` (exact) or the surrogate :math:`r(\\alpha)`. A conv/dense layer
is ``F_l * n(alpha_{l-1}) * n(alpha_l)``; a low-rank layer ``T * (d_in + d_out) * n(alpha)`` (a
sum factor); attention scores ``2 L^2 d_h * n(heads)``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.extend  # for jax.extend.core.Jaxpr: `import jax` alone does not promise it
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcompress.latency import gates as _g
from jaxcompress.models import MLP, SmallCNN, TransformerClassifier
from jaxcompress.models._common import check_positive_int
from jaxcompress.spdy import LayerOptions, TimingTable, measure

__all__ = [
    "PAD_MIN_GAIN",
    "CostTerm",
    "LatencyModel",
    "LayerGraph",
    "OpSpec",
    "attention_macs",
    "conv_macs",
    "cost_graph",
    "count_macs",
    "dense_macs",
    "measure_latency_model",
]

Atom = int | str

# Pad a layer wherever the grid predicts any gain. Measured
# (experiments/benchmarks/latency_padding.py, two runs on a 2-core CPU, 72 padded profiles): the
# 16 paddings with a predicted gain under 5% still ran a median 1.08x faster (11 faster, 2 more
# than 5% slower), against 1.11x for the other 56 (52 faster, 3 slower). A floor saves MACs but
# gives up real speed, so the default has none.
PAD_MIN_GAIN = 0.0


def check_min_gain(value: Any, name: str = "min_gain") -> float:
    """``value`` as a float in ``[0, 1)``, or a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------
# Per-layer formulas
# --------------------------------------------------------------------------------------------


def _nonneg_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
        raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    return int(v)


def conv_macs(kh: int, kw: int, c_in: int, c_out: int, h_out: int, w_out: int, groups: int = 1):
    """``kh kw h_out w_out (c_in / groups) c_out`` multiply-adds of one convolution."""
    vals = [
        _nonneg_int(n, v)
        for n, v in zip(
            "kh kw c_in c_out h_out w_out".split(), (kh, kw, c_in, c_out, h_out, w_out), strict=True
        )
    ]
    groups = _nonneg_int("groups", groups)
    if groups < 1 or c_in % groups:
        raise ValueError(f"groups must be >= 1 and divide c_in={c_in}, got {groups}")
    kh, kw, c_in, c_out, h_out, w_out = vals
    return kh * kw * h_out * w_out * (c_in // groups) * c_out


def dense_macs(d_in: int, d_out: int, tokens: int = 1) -> int:
    """``tokens * d_in * d_out`` multiply-adds of one Dense layer."""
    return _nonneg_int("tokens", tokens) * _nonneg_int("d_in", d_in) * _nonneg_int("d_out", d_out)


def attention_macs(
    length: int, d_model: int, num_heads: int, head_dim: int, *, projections: bool = True
) -> int:
    """Multiply-adds of multi-head self-attention on ``length`` tokens:
    ``Q K^T`` and ``A V`` (``2 L^2 h d_h``) plus, with ``projections``, the Q/K/V and output
    projections (``4 L d_model h d_h``)."""
    L, d, h, dh = (
        _nonneg_int("length", length),
        _nonneg_int("d_model", d_model),
        _nonneg_int("num_heads", num_heads),
        _nonneg_int("head_dim", head_dim),
    )
    return 2 * L * L * h * dh + (4 * L * d * h * dh if projections else 0)


# --------------------------------------------------------------------------------------------
# The static graph
# --------------------------------------------------------------------------------------------

_OP_KINDS = ("conv", "dense", "lowrank", "attention")


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """What to time for a term (see :func:`measure_latency_model`).

    ``kind`` and ``shape``:

    * ``"conv"``: ``(kh, kw, h_in, w_in, stride)``; factors ``(c_in, c_out)``.
    * ``"dense"``: ``(tokens,)``; factors ``(d_in, d_out)``, each multiplied by ``scale``.
    * ``"lowrank"``: ``(tokens,)``; factors ``((d_in, d_out), rank)``.
    * ``"attention"``: ``(length, head_dim)``; factor ``(heads,)``: ``softmax(QK^T) V``.
    """

    kind: str
    shape: tuple[int, ...]
    scale: tuple[int, ...] = ()

    def __post_init__(self):
        if self.kind not in _OP_KINDS:
            raise ValueError(f"OpSpec.kind must be one of {_OP_KINDS}, got {self.kind!r}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "scale", tuple(int(s) for s in self.scale))


@dataclasses.dataclass(frozen=True)
class CostTerm:
    """One cost term ``coef * prod_i sum(atoms_i)`` (see the module docstring).

    Attributes:
      name: unique term name (e.g. ``"blocks/1/conv"``).
      coef: the shape-dependent constant ``F_l`` (e.g. ``kh kw H_o W_o``).
      factors: a tuple of factors, each a tuple of atoms (int sizes or gate-group names).
      op: optional :class:`OpSpec` for latency measurement.
    """

    name: str
    coef: float
    factors: tuple[tuple[Atom, ...], ...]
    op: OpSpec | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"term name must be a non-empty string without spaces: {self.name!r}")
        if not math.isfinite(float(self.coef)) or self.coef < 0:
            raise ValueError(f"term {self.name!r}: coef must be finite and >= 0, got {self.coef}")
        factors = []
        for f in self.factors:
            atoms = (f,) if isinstance(f, (int, str)) else tuple(f)
            if not atoms:
                raise ValueError(f"term {self.name!r}: empty factor")
            for a in atoms:
                if isinstance(a, bool) or not isinstance(a, (int, str)):
                    raise TypeError(f"term {self.name!r}: atoms must be int or str, got {a!r}")
                if isinstance(a, int) and a < 0:
                    raise ValueError(f"term {self.name!r}: negative size {a}")
            factors.append(atoms)
        object.__setattr__(self, "coef", float(self.coef))
        object.__setattr__(self, "factors", tuple(factors))

    @property
    def groups(self) -> tuple[str, ...]:
        """Distinct gate-group names in this term, in order of appearance."""
        seen: list[str] = []
        for f in self.factors:
            for a in f:
                if isinstance(a, str) and a not in seen:
                    seen.append(a)
        return tuple(seen)

    def value(self, counts: Mapping[str, Any]) -> Any:
        """``coef * prod_i sum(atoms)`` with group counts from ``counts`` (numbers or arrays)."""
        out = self.coef
        for f in self.factors:
            s = 0
            for a in f:
                s = s + (counts[a] if isinstance(a, str) else a)
            out = out * s
        return out


@dataclasses.dataclass(frozen=True)
class LayerGraph:
    """Static cost description of a gated (or plain) model; hashable, safe as a jit static.

    Attributes:
      terms: the :class:`CostTerm` s.
      groups: ``((name, size), ...)``: every gate group referenced by a term and its unit count.
    """

    terms: tuple[CostTerm, ...]
    groups: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        terms = tuple(self.terms)
        if not terms or not all(isinstance(t, CostTerm) for t in terms):
            raise ValueError("a LayerGraph needs a non-empty tuple of CostTerm")
        names = [t.name for t in terms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate term names: {dup}")
        groups = tuple((str(n), int(s)) for n, s in self.groups)
        sizes = dict(groups)
        if len(sizes) != len(groups):
            raise ValueError(f"duplicate group names in {groups}")
        for n, s in groups:
            if s < 1:
                raise ValueError(f"group {n!r} must have at least one unit, got {s}")
        for t in terms:
            missing = [g for g in t.groups if g not in sizes]
            if missing:
                raise ValueError(f"term {t.name!r} references unknown groups {missing}")
        object.__setattr__(self, "terms", terms)
        object.__setattr__(self, "groups", groups)

    @property
    def group_sizes(self) -> dict[str, int]:
        return dict(self.groups)

    def macs(self, counts: Mapping[str, Any] | None = None) -> Any:
        """Total cost with the given group counts (default: every group full: the dense cost)."""
        counts = self.group_sizes if counts is None else counts
        missing = [n for n, _ in self.groups if n not in counts]
        if missing:
            raise ValueError(f"counts lacks groups {missing}")
        return sum(t.value(counts) for t in self.terms)

    def dense(self) -> float:
        """Dense cost (every group at full width)."""
        return float(self.macs())

    def per_term(self, counts: Mapping[str, Any] | None = None) -> dict[str, Any]:
        counts = self.group_sizes if counts is None else counts
        return {t.name: t.value(counts) for t in self.terms}


# --------------------------------------------------------------------------------------------
# Graphs of the supported models
# --------------------------------------------------------------------------------------------


def _check_shape(input_shape: Any, ndim: int, what: str) -> tuple[int, ...]:
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise TypeError(f"input_shape must be a tuple of ints ({what}), got {input_shape!r}")
    shape = tuple(input_shape)
    if len(shape) != ndim or any(
        isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in shape
    ):
        raise ValueError(f"input_shape must be {what} (positive ints), got {input_shape!r}")
    return tuple(int(s) for s in shape)


def _cnn_graph(model, input_shape, gated: bool) -> LayerGraph:
    h, w, c = _check_shape(input_shape, 3, "(H, W, C) of one example")
    if c != model.in_channels:
        raise ValueError(f"input_shape has {c} channels, the model expects {model.in_channels}")
    terms, groups = [], []
    prev: Atom = c
    strides = getattr(model, "strides", (1,) * len(model.widths))
    for i, (width, pool, st) in enumerate(
        zip(model.widths, model.pool_after, strides, strict=True)
    ):
        out: Atom = f"blocks/{i}/gate/alpha" if gated else width
        if gated:
            groups.append((out, width))
        ho, wo = -(-h // st), -(-w // st)  # SAME padding
        op = OpSpec("conv", (3, 3, h, w, st))
        terms.append(CostTerm(f"blocks/{i}/conv", 9 * ho * wo, ((prev,), (out,)), op))
        h, w = ho, wo
        prev = out
        if pool:
            h, w = -(-h // 2), -(-w // 2)
    terms.append(
        CostTerm("head", 1, ((prev,), (model.num_classes,)), OpSpec("dense", (1,), (1, 1)))
    )
    return LayerGraph(tuple(terms), tuple(groups))


def _mlp_graph(model, input_shape, gated: bool) -> LayerGraph:
    if math.prod(_check_shape(input_shape, len(input_shape), "one example's shape")) != (
        model.in_features
    ):
        raise ValueError(
            f"input_shape {tuple(input_shape)} has {math.prod(input_shape)} features, the model "
            f"expects {model.in_features}"
        )
    terms, groups = [], []
    prev: Atom = model.in_features
    ranks = getattr(model, "ranks", None)
    widths = model.hidden
    for i, width in enumerate(widths):
        out: Atom = f"gates/{i}/alpha" if gated else width
        if gated:
            groups.append((out, width))
        if ranks is None:
            terms.append(
                CostTerm(f"layers/{i}", 1, ((prev,), (out,)), OpSpec("dense", (1,), (1, 1)))
            )
        else:
            r: Atom = f"layers/{i}/alpha" if gated else ranks[i]
            if gated:
                groups.append((r, ranks[i]))
            terms.append(CostTerm(f"layers/{i}", 1, ((prev, out), (r,)), OpSpec("lowrank", (1,))))
        prev = out
    terms.append(
        CostTerm("head", 1, ((prev,), (model.num_classes,)), OpSpec("dense", (1,), (1, 1)))
    )
    return LayerGraph(tuple(terms), tuple(groups))


def _transformer_graph(model, input_shape, gated: bool) -> LayerGraph:
    (length,) = _check_shape(input_shape, 1, "(L,): the sequence length")
    if length > model.max_len:
        raise ValueError(f"sequence length {length} exceeds the model's max_len={model.max_len}")
    d, dh = model.d_model, model.head_dim
    terms, groups = [], []
    for i, (heads, mlp) in enumerate(zip(model.heads, model.mlp_dims, strict=True)):
        hg: Atom = f"blocks/{i}/attn/head_gate/alpha" if gated else heads
        fg: Atom = f"blocks/{i}/ffn_gate/alpha" if gated else mlp
        if gated:
            groups += [(hg, heads), (fg, mlp)]
        p = f"blocks/{i}"
        terms += [
            CostTerm(
                f"{p}/qkv", 3 * length * dh, ((d,), (hg,)), OpSpec("dense", (length,), (1, 3 * dh))
            ),
            CostTerm(
                f"{p}/scores", 2 * length * length * dh, ((hg,),), OpSpec("attention", (length, dh))
            ),
            CostTerm(f"{p}/out", length * dh, ((hg,), (d,)), OpSpec("dense", (length,), (dh, 1))),
            CostTerm(f"{p}/mlp_in", length, ((d,), (fg,)), OpSpec("dense", (length,), (1, 1))),
            CostTerm(f"{p}/mlp_out", length, ((fg,), (d,)), OpSpec("dense", (length,), (1, 1))),
        ]
    terms.append(CostTerm("head", 1, ((d,), (model.num_classes,)), OpSpec("dense", (1,), (1, 1))))
    return LayerGraph(tuple(terms), tuple(groups))


class _PlainTransformerView:
    """Adapter: read a ``jaxcompress.models.TransformerClassifier``'s sizes."""

    def __init__(self, model: TransformerClassifier):
        self.d_model, self.max_len, self.num_classes = (
            model.d_model,
            model.max_len,
            model.num_classes,
        )
        self.head_dim = model.d_model // model.num_heads
        self.heads = (model.num_heads,) * model.num_layers
        self.mlp_dims = (model.mlp_dim,) * model.num_layers


def cost_graph(model: nnx.Module, input_shape: Sequence[int]) -> LayerGraph:
    """The :class:`LayerGraph` of a supported model for one example of ``input_shape``.

    Gated models (:class:`~jaxcompress.latency.gates.GatedCNN`,
    :class:`~jaxcompress.latency.gates.GatedMLP`,
    :class:`~jaxcompress.latency.gates.GatedTransformerClassifier`,
    :class:`~jaxcompress.latency.gates.LowRankLinear`,
    :class:`~jaxcompress.latency.gates.BitGatedDense`) get gate groups named as
    :func:`~jaxcompress.latency.gates.gate_values` names them; plain models
    (``SmallCNN``, ``MLP``, ``TransformerClassifier`` and the extracted models) get constant
    factors, so ``cost_graph(m, s).dense()`` is their analytic MAC count.

    ``input_shape`` excludes the batch: ``(H, W, C)`` for CNNs, the feature shape for MLPs,
    ``(L,)`` for transformers, ``(d_in,)`` (or ``(T, d_in)``) for a single layer.

    For :class:`BitGatedDense` the cost is bit-weighted: ``T d_in d_out * n(alpha) / levels``
    (full precision = the layer's MACs).
    """
    from jaxcompress.latency.extract import (
        FactorizedLinear,
        FactorizedMLP,
        LevelDense,
        SlimTransformerClassifier,
    )

    if isinstance(model, _g.GatedCNN):
        return _cnn_graph(model, input_shape, True)
    if isinstance(model, SmallCNN):
        return _cnn_graph(model, input_shape, False)
    if isinstance(model, _g.GatedMLP):
        return _mlp_graph(model, input_shape, True)
    if isinstance(model, (MLP, FactorizedMLP)):
        return _mlp_graph(model, input_shape, False)
    if isinstance(model, _g.GatedTransformerClassifier):
        return _transformer_graph(model, input_shape, True)
    if isinstance(model, SlimTransformerClassifier):
        return _transformer_graph(model, input_shape, False)
    if isinstance(model, TransformerClassifier):
        return _transformer_graph(_PlainTransformerView(model), input_shape, False)
    if isinstance(model, (_g.LowRankLinear, _g.BitGatedDense, FactorizedLinear, LevelDense)):
        shape = tuple(input_shape)
        tokens = math.prod(shape[:-1]) if len(shape) > 1 else 1
        if not shape or shape[-1] != model.in_features:
            raise ValueError(
                f"input_shape must end with in_features={model.in_features}, got {input_shape!r}"
            )
        d_in, d_out = model.in_features, model.out_features
        if isinstance(model, _g.LowRankLinear):
            factors = ((d_in, d_out), ("alpha",))
            return LayerGraph(
                (CostTerm("layer", tokens, factors, OpSpec("lowrank", (tokens,))),),
                (("alpha", model.rank),),
            )
        if isinstance(model, FactorizedLinear):
            return LayerGraph(
                (
                    CostTerm(
                        "layer",
                        tokens,
                        ((d_in, d_out), (model.rank,)),
                        OpSpec("lowrank", (tokens,)),
                    ),
                )
            )
        if isinstance(model, _g.BitGatedDense):
            return LayerGraph(
                (CostTerm("layer", tokens * d_in * d_out / model.levels, (("alpha",),)),),
                (("alpha", model.levels),),
            )
        return LayerGraph(
            (CostTerm("layer", tokens * d_in * d_out / model.max_levels, ((model.bits,),)),)
        )
    raise TypeError(f"no cost graph for a {type(model).__name__}")


# --------------------------------------------------------------------------------------------
# Exact counter from the traced computation
# --------------------------------------------------------------------------------------------


def _eqn_macs(eqn) -> int:
    name = eqn.primitive.name
    if name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        out = eqn.outvars[0].aval.shape
        return math.prod(out) * math.prod(lhs[i] for i in lc)
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        out = eqn.outvars[0].aval.shape
        spec = eqn.params["dimension_numbers"].rhs_spec  # (out_dim, in_dim, *spatial)
        per_out = rhs[spec[1]] * math.prod(rhs[i] for i in spec[2:])
        return math.prod(out) * per_out // max(1, eqn.params.get("batch_group_count", 1))
    return 0


def _jaxpr_macs(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += _eqn_macs(eqn)
        name = eqn.primitive.name
        if name == "while":
            raise ValueError(
                "count_macs cannot count a while_loop (unknown trip count); unroll it or use "
                "lax.scan"
            )
        if name == "cond":
            total += max(_jaxpr_macs(b.jaxpr) for b in eqn.params["branches"])
            continue
        mult = eqn.params.get("length", 1) if name == "scan" else 1
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    total += mult * _jaxpr_macs(inner)
    return total


def count_macs(
    model_or_fn: nnx.Module | Callable[..., Any],
    input_shape: Sequence[int],
    *,
    dtype: Any = None,
) -> int:
    """Exact multiply-adds **per example** of a model's forward pass, counted from its jaxpr.

    Traces ``model(x)`` (an NNX model, in eval mode) or ``fn(x)`` on one abstract example of
    shape ``(1, *input_shape)`` and sums, over every ``dot_general`` and
    ``conv_general_dilated`` (sub-jaxprs of ``jit``/``custom_jvp``/``remat`` included, ``scan``
    bodies times their length, the costliest ``cond`` branch), ``prod(out.shape) *
    prod(contracted sizes)``. Nothing is executed, and an abstract model from
    ``nnx.eval_shape`` works as well as a concrete one. This is the ground truth that
    :func:`cost_graph` matches for the supported models.

    Args:
      model_or_fn: an ``nnx.Module`` or a function of one batched input.
      input_shape: one example's shape (no batch axis).
      dtype: input dtype; default ``int32`` for transformer classifiers, else ``float32``.
    """
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise TypeError(f"input_shape must be a tuple of ints, got {input_shape!r}")
    shape = _check_shape(input_shape, len(input_shape), "one example's shape")
    if isinstance(model_or_fn, nnx.Module):
        if dtype is None and isinstance(
            model_or_fn,
            (TransformerClassifier, _g._EncoderClassifier),
        ):
            dtype = jnp.int32
        graphdef, state = nnx.split(
            nnx.view(
                model_or_fn, deterministic=True, use_running_average=True, raise_if_not_found=False
            )
        )

        def fn(state, x):
            return nnx.merge(graphdef, state)(x)

        args: tuple = (state,)
    elif callable(model_or_fn):
        fn, args = model_or_fn, ()
    else:
        raise TypeError(f"model_or_fn must be an nnx.Module or callable, got {model_or_fn!r}")
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32 if dtype is None else dtype)
    return int(_jaxpr_macs(jax.make_jaxpr(fn)(*args, x).jaxpr))


# --------------------------------------------------------------------------------------------
# Latency model: per-term interpolated timing tables
# --------------------------------------------------------------------------------------------


def _interp_axis(xs: np.ndarray, v):
    """Index of the left grid point and the (unclipped) fraction: linear extrapolation."""
    n = xs.shape[0]
    xs_j = jnp.asarray(xs, jnp.float32)
    i = jnp.clip(jnp.searchsorted(xs_j, v, side="right") - 1, 0, n - 2)
    t = (v - xs_j[i]) / (xs_j[i + 1] - xs_j[i])
    return i, t


def _multilinear(axes: tuple[np.ndarray, ...], table: np.ndarray, point: Sequence[Any]):
    """Multilinear interpolation (linear extrapolation outside the grid, floored at 0)."""
    tab = jnp.asarray(table, jnp.float32)
    live = [k for k, xs in enumerate(axes) if xs.shape[0] > 1]
    idx = [jnp.zeros((), jnp.int32)] * len(axes)
    frac = [None] * len(axes)
    for k in live:
        idx[k], frac[k] = _interp_axis(axes[k], jnp.asarray(point[k], jnp.float32))
    total = jnp.zeros((), jnp.float32)
    for corner in itertools.product((0, 1), repeat=len(live)):
        w = jnp.ones((), jnp.float32)
        pos = list(idx)
        for k, c in zip(live, corner, strict=True):
            w = w * (frac[k] if c else 1.0 - frac[k])
            pos[k] = idx[k] + c
        total = total + w * tab[tuple(pos)]
    return jnp.maximum(total, 0.0)


_LABEL_RE = re.compile(r"^([^=,]+)=(\d+)$")


@dataclasses.dataclass(frozen=True, eq=False)
class LatencyModel:
    """Per-term latency ``T_t(widths)`` interpolated on a measured grid, plus a fixed overhead.

    For a term with gated groups ``g_1..g_k`` (``k`` = 0, 1, 2, ...), ``grids[name]`` holds the
    measured widths of each group and a ``k``-D array of times; the latency at (possibly
    fractional, e.g. surrogate) widths is multilinear in the grid (linear extrapolation outside
    it, floored at 0), hence differentiable almost everywhere. The model's latency is

    .. math::  T(\\alpha) = T_{\\text{overhead}} + \\sum_t T_t(n(\\alpha_{g_1}), \\dots).

    Stored as a :class:`jaxcompress.spdy.TimingTable` (one layer per term, labels
    ``"g1=16,g2=32"``, option 0 = full width) by :meth:`to_table` / :meth:`from_table`, so the
    SPDY tooling (JSON, text format) serves both methods.
    """

    graph: LayerGraph
    grids: Mapping[str, tuple[tuple[str, ...], tuple[np.ndarray, ...], np.ndarray]]
    overhead: float = 0.0

    def __post_init__(self):
        if not isinstance(self.graph, LayerGraph):
            raise TypeError(f"graph must be a LayerGraph, got {type(self.graph).__name__}")
        if not math.isfinite(float(self.overhead)) or self.overhead < 0:
            raise ValueError(f"overhead must be finite and >= 0, got {self.overhead!r}")
        for t in self.graph.terms:
            if t.name not in self.grids:
                raise ValueError(f"no timing grid for term {t.name!r}")
            groups, axes, times = self.grids[t.name]
            if tuple(groups) != t.groups:
                raise ValueError(f"term {t.name!r}: grid groups {groups} != term groups {t.groups}")
            if times.shape != tuple(a.shape[0] for a in axes):
                raise ValueError(f"term {t.name!r}: times shape {times.shape} != grid {axes}")

    def term_latency(self, name: str, counts: Mapping[str, Any]):
        groups, axes, times = self.grids[name]
        if not groups:
            return jnp.asarray(times.reshape(()), jnp.float32)
        return _multilinear(axes, times, [counts[g] for g in groups])

    def latency(self, counts: Mapping[str, Any] | None = None):
        """Modelled latency (seconds) at the given group counts (default: dense)."""
        counts = self.graph.group_sizes if counts is None else counts
        total = jnp.asarray(self.overhead, jnp.float32)
        for t in self.graph.terms:
            total = total + self.term_latency(t.name, counts)
        return total

    def monotone(self) -> LatencyModel:
        """The model with every grid replaced by its lower envelope over wider widths,

        .. math::  \\tilde T_t(c) = \\min_{c' \\ge c} T_t(c')

        (componentwise, over the grid),

        so that no term gets faster as a layer gets wider. Measured CPU grids are not monotone:
        XLA:CPU ran the surrogate CNN's 1-input-channel first conv slower at 4-16 output
        channels than at 20-32, and a 56-channel conv slower than a 64-channel one
        (``experiments/surrogate/RESULTS.md``). A latency surrogate steered by such a grid
        keeps those layers wide. A layer can always be zero-padded to a wider, faster width
        with the same function, so the envelope is an attainable latency (at the padded
        width), and its slope is never negative.
        """
        grids = {}
        for name, (groups, axes, times) in self.grids.items():
            env = np.asarray(times, np.float64)
            for axis in range(env.ndim):
                flipped = np.flip(env, axis)
                env = np.flip(np.minimum.accumulate(flipped, axis=axis), axis)
            grids[name] = (groups, axes, env)
        return LatencyModel(self.graph, grids, self.overhead)

    def fastest_widths(
        self,
        counts: Mapping[str, int],
        *,
        min_gain: float = PAD_MIN_GAIN,
        max_combinations: int = 65536,
    ) -> dict[str, int]:
        """The widths, each at least its group's count, at which the modelled latency is lowest.

        A kept layer can be zero-padded to any wider width with the same function, so the
        fastest width at least as wide is attainable. :meth:`monotone` prices a width at that
        envelope; this returns the widths that attain it, to extract the model at:

        .. math::  c^\\star = \\arg\\min_{c' \\ge c}\\ T(c'),

        over ``c'_g`` in ``{c_g}`` and the grid widths of group ``g`` above ``c_g``. All
        combinations are compared when there are at most ``max_combinations``, otherwise
        coordinate descent (one group at a time, all its candidates, until no group moves).
        Ties go to the narrower model.

        Args:
          counts: ``{group: int}`` for every group of the graph, each in ``[1, size]``.
          min_gain: widen only if the modelled latency drops by at least this fraction
            (``[0, 1)``; default :data:`PAD_MIN_GAIN` = 0: measured, small predicted gains were
            mostly real). Raise it to spend fewer FLOPs on widening.
          max_combinations: the exhaustive search limit.

        Returns:
          ``{group: width}``, each ``>= counts[group]``; ``counts`` itself when no candidate is
          faster by ``min_gain``.
        """
        sizes = self.graph.group_sizes
        if not isinstance(counts, Mapping) or set(counts) != set(sizes):
            got = sorted(counts) if isinstance(counts, Mapping) else counts
            raise ValueError(f"counts must map every group {sorted(sizes)} to an int, got {got!r}")
        for g, c in counts.items():
            if isinstance(c, bool) or not isinstance(c, numbers.Integral) or not 1 <= c <= sizes[g]:
                raise ValueError(f"counts[{g!r}] must be an int in [1, {sizes[g]}], got {c!r}")
        check_min_gain(min_gain)
        check_positive_int("max_combinations", max_combinations)
        names = [g for g, _ in self.graph.groups]
        grid: dict[str, set[int]] = {g: set() for g in names}
        for groups, axes, _ in self.grids.values():
            for g, axis in zip(groups, axes, strict=True):
                grid[g].update(int(w) for w in axis)
        candidates = {
            g: np.array(
                [int(counts[g])] + sorted(w for w in grid[g] if counts[g] < w <= sizes[g]),
                np.float32,
            )
            for g in names
        }
        latency = jax.jit(jax.vmap(self.latency))

        def best(combos: dict[str, np.ndarray]) -> dict[str, int]:
            times = np.asarray(latency({g: jnp.asarray(v) for g, v in combos.items()}))
            total = sum(combos.values())
            i = int(np.lexsort((total, times))[0])  # fastest, then narrowest
            return {g: int(combos[g][i]) for g in names}

        if math.prod(len(v) for v in candidates.values()) <= max_combinations:
            mesh = np.meshgrid(*candidates.values(), indexing="ij")
            choice = best({g: m.ravel() for g, m in zip(names, mesh, strict=True)})
        else:
            choice = {g: int(counts[g]) for g in names}
            for _ in range(len(names) * max(len(v) for v in candidates.values())):
                before = dict(choice)
                for g in names:
                    others = {h: np.full(len(candidates[g]), choice[h], np.float32) for h in names}
                    choice = best({**others, g: candidates[g]})
                if choice == before:
                    break
        start = float(self.latency({g: float(counts[g]) for g in names}))
        faster = float(self.latency({g: float(w) for g, w in choice.items()}))
        if faster > (1.0 - min_gain) * start:
            return {g: int(counts[g]) for g in names}
        return choice

    def dense(self) -> float:
        """Modelled full-width latency (a Python float, also inside a jit trace)."""
        with jax.ensure_compile_time_eval():
            return float(self.latency())

    def to_table(self) -> TimingTable:
        layers = []
        for t in self.graph.terms:
            groups, axes, times = self.grids[t.name]
            combos = list(itertools.product(*[range(a.shape[0]) for a in axes]))
            combos.sort(key=lambda c: tuple(-i for i in c))  # full width first
            labels = [
                ",".join(
                    f"{g}={int(axes[k][i])}" for k, (g, i) in enumerate(zip(groups, c, strict=True))
                )
                or "dense"
                for c in combos
            ]
            layers.append(LayerOptions(t.name, tuple(labels), [float(times[c]) for c in combos]))
        prunable = float(sum(layer.times[0] for layer in layers))
        return TimingTable(base=prunable + self.overhead, prunable=prunable, layers=tuple(layers))

    @classmethod
    def from_table(cls, graph: LayerGraph, table: TimingTable) -> LatencyModel:
        """Inverse of :meth:`to_table` (labels ``"group=width,..."``, or ``"dense"``)."""
        grids = {}
        for t in graph.terms:
            layer = table[t.name]
            points: dict[tuple[int, ...], float] = {}
            for label, time in zip(layer.labels, layer.times, strict=True):
                if not t.groups:
                    points[()] = float(time)
                    continue
                parts = [_LABEL_RE.match(p) for p in label.split(",")]
                if any(m is None for m in parts) or tuple(m[1] for m in parts) != t.groups:
                    raise ValueError(
                        f"term {t.name!r}: label {label!r} does not name the groups {t.groups}"
                    )
                points[tuple(int(m[2]) for m in parts)] = float(time)
            axes = tuple(
                np.array(sorted({p[k] for p in points}), np.float64) for k in range(len(t.groups))
            )
            times = np.empty(tuple(a.shape[0] for a in axes))
            for pos in itertools.product(*[range(a.shape[0]) for a in axes]):
                key = tuple(int(axes[k][i]) for k, i in enumerate(pos))
                if key not in points:
                    raise ValueError(f"term {t.name!r}: the grid misses point {key}")
                times[pos] = points[key]
            grids[t.name] = (t.groups, axes, times)
        return cls(graph, grids, max(0.0, table.base - table.prunable))


def _grid_widths(size: int, multipliers: Sequence[float]) -> tuple[int, ...]:
    return tuple(sorted({max(1, min(size, round(m * size))) for m in multipliers}))


def _op_callable(op: OpSpec, atoms: tuple[tuple[int, ...], ...], batch: int, dtype):
    """``(fn, args)`` that runs the op at the given atom sizes on random inputs."""
    key = jax.random.key(0)
    k1, k2, k3 = jax.random.split(key, 3)
    sums = [sum(f) for f in atoms]
    if op.kind == "conv":
        kh, kw, h, w, stride = op.shape
        x = jax.random.normal(k1, (batch, h, w, sums[0]), dtype)
        k = jax.random.normal(k2, (kh, kw, sums[0], sums[1]), dtype)

        def fn(x, k):
            return jax.lax.conv_general_dilated(
                x, k, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )

        return fn, (x, k)
    if op.kind == "dense":
        (tokens,) = op.shape
        scale = op.scale or (1, 1)
        d_in, d_out = sums[0] * scale[0], sums[1] * scale[1]
        x = jax.random.normal(k1, (batch * tokens, d_in), dtype)
        k = jax.random.normal(k2, (d_in, d_out), dtype)
        return (lambda x, k: x @ k), (x, k)
    if op.kind == "lowrank":
        (tokens,) = op.shape
        (d_in, d_out), (r,) = atoms[0], (sums[1],)
        x = jax.random.normal(k1, (batch * tokens, d_in), dtype)
        u = jax.random.normal(k2, (d_in, r), dtype)
        v = jax.random.normal(k3, (r, d_out), dtype)
        return (lambda x, u, v: (x @ u) @ v), (x, u, v)
    length, dh = op.shape
    shape = (batch, length, sums[0], dh)
    q, k, v = (jax.random.normal(kk, shape, dtype) for kk in (k1, k2, k3))

    def attn(q, k, v):
        s = jax.nn.softmax(jnp.einsum("nqhd,nkhd->nhqk", q, k), axis=-1)
        return jnp.einsum("nhqk,nkhd->nqhd", s, v)

    return attn, (q, k, v)


def measure_latency_model(
    graph: LayerGraph,
    *,
    multipliers: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    batch: int = 1,
    overhead: float = 0.0,
    repeats: int = 25,
    warmup: int = 3,
    dtype: Any = jnp.float32,
    clock: str = "wall",
    compiler_options: Mapping[str, Any] | None = None,
) -> LatencyModel:
    """Time every term of ``graph`` on the current device on a width grid.

    Each gated group ``g`` of size ``n`` is measured at widths ``round(m n)`` for ``m`` in
    ``multipliers``; a term with ``k`` groups is timed at every grid combination (``len(m)^k``
    runs) with :func:`jaxcompress.spdy.measure` (jit, warm-up, interleaved rounds, median, the
    per-call overhead subtracted). Terms need an :class:`OpSpec`. ``overhead`` is the time of
    everything outside the terms.

    ``clock`` and ``compiler_options`` are passed to :func:`jaxcompress.spdy.measure`. On a
    shared CPU, ``clock="cpu"`` with ``compiler_options={"xla_cpu_multi_thread_eigen": False}``
    (this process's CPU time of single-threaded executables) and a large ``batch`` give far
    steadier grids than the wall clock (``experiments/surrogate/RESULTS.md``).
    """
    if not isinstance(graph, LayerGraph):
        raise TypeError(f"graph must be a LayerGraph, got {type(graph).__name__}")
    mults = tuple(multipliers)
    if not mults or any(not (0 < float(m) <= 1) for m in mults):
        raise ValueError(f"multipliers must be non-empty, each in (0, 1], got {multipliers!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    sizes = graph.group_sizes
    builders, options, grid_axes = {}, {}, {}
    for t in graph.terms:
        if t.op is None:
            raise ValueError(f"term {t.name!r} has no OpSpec; cannot time it")
        axes = tuple(np.array(_grid_widths(sizes[g], mults), np.float64) for g in t.groups)
        grid_axes[t.name] = axes
        combos = list(itertools.product(*[tuple(int(v) for v in a) for a in axes]))
        combos.sort(key=lambda c: tuple(-v for v in c))
        options[t.name] = combos

        def builder(combo, t=t):
            counts = dict(zip(t.groups, combo, strict=True))
            atoms = tuple(
                tuple(counts[a] if isinstance(a, str) else a for a in f) for f in t.factors
            )
            return _op_callable(t.op, atoms, batch, dtype)

        builders[t.name] = builder

    def label(combo):
        return ",".join(str(v) for v in combo) or "dense"

    table = measure(
        builders,
        options,
        overhead=overhead,
        label_fn=label,
        repeats=repeats,
        warmup=warmup,
        clock=clock,
        compiler_options=compiler_options,
    )
    grids = {}
    for t in graph.terms:
        axes = grid_axes[t.name]
        times = np.empty(tuple(a.shape[0] for a in axes))
        for combo, time in zip(options[t.name], table[t.name].times, strict=True):
            pos = tuple(int(np.searchsorted(axes[k], v)) for k, v in enumerate(combo))
            times[pos] = time
        grids[t.name] = (t.groups, axes, times)
    return LatencyModel(graph, grids, float(overhead))
