"""Extraction of a physically smaller plain model from a gated one, plus timing, fine-tuning
and the uniform-width baseline.

Nasery et al., arXiv:2306.05785 (spec 4.2, "Extraction"):

1. threshold each gate group: unit ``j`` survives iff
   :math:`\\alpha_j \\ge \\tau \\max_k \\alpha_k` and :math:`\\alpha_j > 0`, with
   :math:`\\tau = 10^{-2}` by default (a team choice: the paper's value is not verified); a
   group keeps at least its largest unit, so every layer keeps a width >= 1 (an all-zero group
   keeps one unit whose folded gate is 0: the function is unchanged); optionally
   (``multiple``) round each kept count up to a multiple, e.g. 8, by also keeping the largest
   removed gates, since odd channel counts run far slower on many backends; with a cost
   ceiling (``max_macs``) too, lower the rounded counts to smaller multiples, dropping the
   smallest kept gates, until the model fits (:func:`fit_counts_to_budget`); or, with a
   measured ``latency_model``, widen each count to the fastest width at least as wide
   (:meth:`~jaxcompress.latency.LatencyModel.fastest_widths`: zero-padding that runs faster);
2. remove the other channels / neurons / heads / ranks / quantization levels;
3. fold the surviving gates into the weights: into BatchNorm's ``scale``/``bias`` for the CNN
   (gate after BN, before the ReLU; a kept channel whose gate is 0 gets its layer's mean gate
   and zero weights in the next layer instead, so that it can train again), into the next
   layer's input rows for the MLP, the attention output projection and ``mlp_out`` (gate
   after the activation), into ``v``'s rows for a low-rank layer, into the level gains for the
   quantized layer;
4. :func:`finetune` the result briefly;
5. report the exact cost from the extracted shapes (:func:`jaxcompress.latency.count_macs`).

When every removed gate is exactly 0 the extracted model computes the same function (up to
float rounding of the folding), in train and in eval mode.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxcompress.latency import gates as _g
from jaxcompress.latency.cost import (
    PAD_MIN_GAIN,
    LatencyModel,
    check_min_gain,
    cost_graph,
    count_macs,
)
from jaxcompress.latency.surrogate import check_multiple, group_multiples, round_up_count
from jaxcompress.models import MLP, SmallCNN, TransformerClassifier
from jaxcompress.models._common import check_int_tuple, check_positive_int, check_rngs

__all__ = [
    "DEFAULT_TAU",
    "Extracted",
    "FactorizedLinear",
    "FactorizedMLP",
    "LevelDense",
    "SlimTransformerClassifier",
    "calibration_loss",
    "extract",
    "finetune",
    "fit_counts_to_budget",
    "kept_units",
    "measure_latency",
    "scale_width",
    "uniform_width_models",
]

DEFAULT_TAU = 1e-2


# --------------------------------------------------------------------------------------------
# Plain (extracted) modules
# --------------------------------------------------------------------------------------------


class FactorizedLinear(nnx.Module):
    """Plain low-rank Dense ``y = (x @ u) @ v + b`` with ``u`` ``(in, rank)``, ``v``
    ``(rank, out)``: ``(in + out) * rank`` multiply-adds per row."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, *, use_bias=True, rngs: nnx.Rngs
    ):
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.rank = check_positive_int("rank", rank)
        check_rngs(rngs)
        init = nnx.initializers.lecun_normal()
        self.u = nnx.Param(init(rngs.params(), (self.in_features, self.rank)))
        self.v = nnx.Param(init(rngs.params(), (self.rank, self.out_features)))
        self.bias = nnx.Param(jnp.zeros((self.out_features,))) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = (x @ self.u[...]) @ self.v[...]
        return y if self.bias is None else y + self.bias[...]


class FactorizedMLP(nnx.Module):
    """ReLU MLP whose hidden layers are :class:`FactorizedLinear` (ranks per layer) and whose
    head is a Dense layer; the extracted form of a low-rank :class:`GatedMLP`."""

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        ranks: Sequence[int],
        num_classes: int = 10,
        *,
        rngs: nnx.Rngs,
    ):
        self.in_features = check_positive_int("in_features", in_features)
        self.hidden = check_int_tuple("hidden", hidden)
        self.ranks = check_int_tuple("ranks", ranks)
        if len(self.ranks) != len(self.hidden):
            raise ValueError(f"ranks {self.ranks} needs one entry per hidden layer {self.hidden}")
        self.num_classes = check_positive_int("num_classes", num_classes)
        check_rngs(rngs)
        sizes = (self.in_features, *self.hidden)
        self.layers = nnx.List(
            [
                FactorizedLinear(a, b, r, rngs=rngs)
                for a, b, r in zip(sizes[:-1], sizes[1:], self.ranks, strict=True)
            ]
        )
        self.head = nnx.Linear(self.hidden[-1], self.num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.in_features:
            raise ValueError(
                f"FactorizedMLP expects x of shape (N, ...) with {self.in_features} features, "
                f"got shape {x.shape}"
            )
        h = jnp.reshape(x, (x.shape[0], self.in_features))
        for layer in self.layers:
            h = jax.nn.relu(layer(h))
        return self.head(h)


class LevelCodes(nnx.Variable):
    """Fixed int8 ternary codes of a :class:`LevelDense` (not trained)."""


class LevelDense(nnx.Module):
    """Quantized Dense with the kept residual levels of a :class:`BitGatedDense`:

    .. math::  W = \\sum_{k \\in \\text{kept}} (s_k c_k)\\, g_k,

    ``codes`` ``int8[bits, in, out]`` in ``{-1, 0, 1}``, ``steps`` and ``gains`` ``[bits]``.
    ``bits`` (the number of kept levels) is the layer's bit-width; ``max_levels`` the gated
    layer's ``levels``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        *,
        max_levels: int | None = None,
        use_bias: bool = True,
    ):
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.bits = check_positive_int("bits", bits)
        self.max_levels = check_positive_int("max_levels", max_levels or bits)
        self.codes = LevelCodes(
            jnp.zeros((self.bits, self.in_features, self.out_features), jnp.int8)
        )
        self.steps = LevelCodes(jnp.ones((self.bits,), jnp.float32))
        self.gains = nnx.Param(jnp.ones((self.bits,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((self.out_features,))) if use_bias else None

    def kernel(self) -> jax.Array:
        steps, gains = self.steps[...], self.gains[...]
        codes = self.codes[...].astype(gains.dtype)
        w = (steps[0] * codes[0]) * gains[0]
        for k in range(1, self.bits):
            w = w + (steps[k] * codes[k]) * gains[k]
        return w

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel()
        return y if self.bias is None else y + self.bias[...]


class SlimTransformerClassifier(_g._EncoderClassifier):
    """Plain transformer classifier with per-layer head counts and FFN widths (the extracted
    form of :class:`~jaxcompress.latency.gates.GatedTransformerClassifier`; same call API).

    Args: ``vocab_size``, ``num_classes``, ``d_model``, ``head_dim``, ``heads`` (per layer),
    ``mlp_dims`` (per layer), ``max_len``, ``dropout``, ``rngs``.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int = 2,
        *,
        d_model: int,
        head_dim: int,
        heads: Sequence[int],
        mlp_dims: Sequence[int],
        max_len: int = 64,
        dropout: float = 0.1,
        rngs: nnx.Rngs,
    ):
        self._build(
            vocab_size,
            num_classes,
            d_model,
            head_dim,
            heads,
            mlp_dims,
            max_len,
            dropout,
            False,
            "identity",
            rngs,
        )


# --------------------------------------------------------------------------------------------
# Thresholding and gate checks
# --------------------------------------------------------------------------------------------


def _check_tau(tau: Any) -> float:
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0 <= tau < 1:
        raise ValueError(f"tau must be a float in [0, 1), got {tau!r}")
    return float(tau)


def kept_units(a: Any, tau: float = DEFAULT_TAU, multiple: int = 1) -> np.ndarray:
    """Sorted indices of the units that survive: ``a_j >= tau * max(a)`` and ``a_j > 0``; the
    index of the largest gate if none does (so a layer never becomes empty).

    With ``multiple > 1`` the count is rounded up to a multiple of it (at most ``len(a)``) by
    also keeping the largest of the removed gates (ties: lower index first). Kernels of many
    backends run channel counts that are multiples of 8 much faster than odd ones (on XLA:CPU,
    ``experiments/surrogate/RESULTS.md``); :func:`extract` folds a kept unit whose gate is 0
    so that the extracted model computes the same function.
    """
    tau = _check_tau(tau)
    multiple = check_multiple(multiple)
    a = np.asarray(a, np.float64)
    keep = np.flatnonzero((a >= tau * a.max()) & (a > 0))
    if not keep.size:
        keep = np.array([int(np.argmax(a))])
    return _widen(a, keep, round_up_count(keep.size, multiple, a.size))


def _widen(a: np.ndarray, keep: np.ndarray, count: int) -> np.ndarray:
    """``keep`` plus the largest other gates of ``a``, ``count`` units in all (sorted)."""
    rest = np.setdiff1d(np.arange(a.size), keep)
    order = rest[np.argsort(-a[rest], kind="stable")]
    return np.sort(np.concatenate([keep, order[: count - keep.size]]))


def _check_latency_model(
    latency_model: Any, values: Mapping[str, Any], max_macs: Any, min_gain: Any
) -> None:
    if not isinstance(latency_model, LatencyModel):
        raise TypeError(f"latency_model must be a LatencyModel, got {type(latency_model).__name__}")
    if max_macs is not None:
        raise ValueError("latency_model (widening) and max_macs (a ceiling) cannot be combined")
    sizes = latency_model.graph.group_sizes
    shapes = {n: int(np.size(v)) for n, v in values.items()}
    if sizes != shapes:
        raise ValueError(f"latency_model's groups {sizes} do not match the model's gates {shapes}")
    check_min_gain(min_gain, "pad_min_gain")


def _ranking(a: np.ndarray) -> np.ndarray:
    """Indices of ``a`` from the largest entry down (ties: lower index first)."""
    return np.argsort(-a, kind="stable")


def _top_units(a: np.ndarray, count: int) -> np.ndarray:
    """Sorted indices of the ``count`` largest entries of ``a`` (ties: lower index first)."""
    return np.sort(_ranking(a)[:count])


def fit_counts_to_budget(
    values: Mapping[str, Any],
    graph: Any,
    counts: Mapping[str, int],
    multiples: Mapping[str, int],
    max_macs: float,
    *,
    loss: Callable[[Mapping[str, np.ndarray]], float] | None = None,
) -> dict[str, int]:
    """Lower ``counts`` in steps of each group's multiple until ``graph.macs(counts) <= max_macs``.

    Rounding kept counts *up* to a multiple (:func:`kept_units`) adds cost the controller did
    not steer: up to ``multiple - 1`` units per group, 25% more MACs at a 0.2 target on the
    surrogate experiment's CNN. This spends that cost back greedily. Each step lowers one
    group ``g`` to its next smaller multiple (never below ``min(multiple, size)``), the group
    whose step drops the least gate mass per MAC saved:

    .. math:: g^* = \\arg\\min_g
              \\frac{\\sum_{j \\in \\text{dropped}_g} \\alpha_{g,j} / \\max_k \\alpha_{g,k}}
              {\\text{MACs}(c) - \\text{MACs}(c - \\delta_g)},

    with the dropped units the smallest kept gates. Gates are compared relative to their
    group's largest, as the extraction threshold is, since a group followed by a
    normalisation has no scale of its own. Zero gates (fill units) go first; ties go to the
    larger saving.

    Gate mass is a poor proxy where a narrow layer is a bottleneck. With ``loss`` (e.g.
    :func:`calibration_loss`: the loss on a calibration batch with only the kept units on),
    the numerator is the measured loss increase of the step instead, as SPDY measures its
    per-layer errors; each step then costs one loss evaluation per group.

    Args:
      values: ``{group: gate values}``.
      graph: the model's :class:`~jaxcompress.latency.LayerGraph` (``graph.macs(counts)``).
      counts: ``{group: count}`` to start from (e.g. the rounded-up kept counts); groups the
        graph does not reference are returned unchanged.
      multiples: ``{group: multiple}``.
      max_macs: the cost ceiling.
      loss: optional ``loss({group: kept unit indices}) -> float``; see above.

    Returns:
      ``{group: count}`` with ``graph.macs(counts) <= max_macs``.

    Raises:
      ValueError: no counts with these multiples fit ``max_macs`` (the message gives the
        cheapest reachable cost).
    """
    counts = {k: int(v) for k, v in counts.items()}
    sizes = dict(graph.groups)
    gates = {n: np.asarray(values[n], np.float64).ravel() for n in counts}
    order = {n: _ranking(a) for n, a in gates.items()}
    cost = float(graph.macs(counts))

    def kept(c: Mapping[str, int]) -> dict[str, np.ndarray]:
        return {n: np.sort(order[n][:k]) for n, k in c.items()}

    def relative_mass(name: str, lo: int, hi: int) -> float:
        """Sum of the gates ranked ``lo .. hi - 1``, relative to the group's largest."""
        a = gates[name]
        top = a.max()
        return float(a[order[name][lo:hi]].sum() / (top if top > 0 else 1.0))

    current = None if loss is None else float(loss(kept(counts)))
    while cost > max_macs:
        best = None
        for name, size in sizes.items():
            m, c = multiples[name], counts[name]
            lower = -(-c // m) * m - m  # next multiple below c (c itself may be the size)
            if lower < min(m, size):
                continue
            trial = {**counts, name: lower}
            saved = cost - float(graph.macs(trial))
            if saved <= 0:
                continue
            if loss is None:
                lost, trial_loss = relative_mass(name, lower, c), None
            else:
                trial_loss = float(loss(kept(trial)))
                lost = trial_loss - current
            key = (lost / saved, -saved)
            if best is None or key < best[0]:
                best = (key, name, lower, cost - saved, trial_loss)
        if best is None:
            raise ValueError(
                f"max_macs={max_macs!r} is below the cheapest model with these multiples "
                f"({cost:.0f} MACs at counts {counts})"
            )
        _, name, lower, cost, current = best
        counts[name] = lower
    return counts


def calibration_loss(model: nnx.Module, x: Any, y: Any) -> Callable[[Mapping[str, Any]], float]:
    """``loss(kept) -> float``: the mean cross-entropy of ``model`` (eval mode) on the batch
    ``(x, y)`` with only the ``kept`` units of every gate group on (the other gates set to 0),
    for :func:`fit_counts_to_budget` and ``extract(budget_loss=...)``.

    Zeroed gates give the function of the extracted model (extraction is exact for zero
    gates), so this is the loss a step of budget fitting would cost, without building the
    smaller model: one compiled executable serves every call.

    Args:
      model: a gated model (its gates are read, not changed).
      x, y: a calibration batch: inputs and integer labels.
    """
    view = nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)
    graphdef, gates, rest = nnx.split(view, _g.Gate, ...)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(gates)
    names = [_g.path_str(path) for path, _ in leaves]
    softplus = {
        name: var.get_metadata().get("parametrization", "identity") == "softplus"
        for name, var in zip(
            names, jax.tree_util.tree_leaves(gates, is_leaf=_g._is_var), strict=True
        )
    }
    sizes = {name: int(np.size(value)) for name, (_, value) in zip(names, leaves, strict=True)}
    x, y = jnp.asarray(x), jnp.asarray(y)

    off = [-jnp.inf if softplus[n] else 0.0 for n in names]  # the stored value of a 0 gate

    @jax.jit
    def masked_loss(masks, gates, rest):
        raw = jax.tree_util.tree_leaves(gates)
        new = [jnp.where(m, v, o) for m, v, o in zip(masks, raw, off, strict=True)]
        logits = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, new), rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def loss(kept: Mapping[str, Any]) -> float:
        masks = []
        for name in names:
            mask = np.zeros(sizes[name], bool)
            mask[np.asarray(kept[name], np.int64)] = True
            masks.append(jnp.asarray(mask))
        return float(masked_loss(masks, gates, rest))

    return loss


def _resolve_gates(model: nnx.Module, gates: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    own = {k: np.asarray(v) for k, v in _g.gate_values(model).items()}
    if not own:
        raise TypeError(f"{type(model).__name__} has no Gate variables to extract from")
    if gates is None:
        out = own
    else:
        if isinstance(gates, nnx.State) or not isinstance(gates, Mapping):
            gates = _g.gate_values(gates)
        out = {}
        extra = sorted(set(gates) - set(own))
        missing = sorted(set(own) - set(gates))
        if extra or missing:
            raise ValueError(
                f"gates do not match the model: missing {missing}, unexpected {extra}; the "
                f"model's gates are {sorted(own)}"
            )
        for name, ref in own.items():
            arr = np.asarray(gates[name])
            if arr.shape != ref.shape:
                raise ValueError(
                    f"gate {name!r} has shape {arr.shape}, the model's gate has shape {ref.shape}"
                )
            out[name] = arr
    for name, arr in out.items():
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"gate {name!r} has non-finite values")
        if np.any(arr < 0):
            raise ValueError(
                f"gate {name!r} has negative values (min {float(arr.min())!r}); gates must be "
                "non-negative: train with project_nonnegative() or the softplus parametrization"
            )
    return out


@dataclasses.dataclass
class Extracted:
    """What :func:`extract` returns.

    Attributes:
      model: the plain, smaller model (in eval mode; ``fit`` trains it in train mode). Its
        dropout RNG streams, if any, start from ``key(0)``.
      kept: ``{gate group: kept unit indices}``.
      widths: ``{gate group: number kept}``.
      macs: exact multiply-adds per example from the extracted shapes (with ``input_shape``),
        else ``None``.
    """

    model: nnx.Module
    kept: dict[str, np.ndarray]
    widths: dict[str, int]
    macs: int | None = None


def _blank(ctor: Any) -> nnx.Module:
    """Build ``ctor()`` without running its initialisers: every array is zeros (RNG stream
    keys ``key(0)``). Extraction overwrites each parameter, so random initialisation (and its
    per-shape compilation) would be wasted work."""
    graphdef, state = nnx.split(nnx.eval_shape(ctor))

    def concrete(leaf):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            key = jax.random.key(0)
            return key if leaf.shape == () else jax.random.split(key, leaf.shape)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return nnx.merge(graphdef, jax.tree.map(concrete, state))


def _set(var: nnx.Variable, value: Any) -> None:
    value = jnp.asarray(value, var[...].dtype)
    if value.shape != var[...].shape:
        raise AssertionError(f"internal shape mismatch {value.shape} vs {var[...].shape}")
    var[...] = value


def _np(var: nnx.Variable) -> np.ndarray:
    return np.asarray(var[...])


def _copy_linear(dst: nnx.Linear, src: nnx.Linear, rows=None, cols=None, row_scale=None):
    k = _np(src.kernel)
    if rows is not None:
        k = k[rows]
    if cols is not None:
        k = k[:, cols]
    if row_scale is not None:
        k = k * row_scale[:, None]
    _set(dst.kernel, k)
    if src.bias is not None:
        b = _np(src.bias)
        _set(dst.bias, b if cols is None else b[cols])


def _copy_layernorm(dst: nnx.LayerNorm, src: nnx.LayerNorm):
    for attr in ("scale", "bias"):
        if getattr(src, attr, None) is not None:
            _set(getattr(dst, attr), _np(getattr(src, attr)))


def _extract_cnn(model: _g.GatedCNN, gates, keep):
    n = len(model.blocks)
    kept = {f"blocks/{i}/gate/alpha": keep(f"blocks/{i}/gate/alpha") for i in range(n)}
    widths = tuple(len(kept[f"blocks/{i}/gate/alpha"]) for i in range(len(model.blocks)))
    new = _blank(
        lambda: SmallCNN(
            model.in_channels,
            model.num_classes,
            widths,
            strides=model.strides,
            pool_after=model.pool_after,
            rngs=nnx.Rngs(0),
        )
    )
    prev = np.arange(model.in_channels)
    prev_live = np.ones(model.in_channels, np.float32)
    for i, (src, dst) in enumerate(zip(model.blocks, new.blocks, strict=True)):
        full = gates[f"blocks/{i}/gate/alpha"]
        k = kept[f"blocks/{i}/gate/alpha"]
        a, live = _revive(full[k] / (float(_g.gate_rms(full)) if src.normalize else 1.0))
        kernel = _np(src.conv.kernel)[:, :, prev][:, :, :, k] * prev_live[None, None, :, None]
        _set(dst.conv.kernel, kernel)
        # gate after BN: a * (gamma * z_hat + beta) = (a gamma) z_hat + a beta
        _set(dst.bn.scale, _np(src.bn.scale)[k] * a)
        _set(dst.bn.bias, _np(src.bn.bias)[k] * a)
        _set(dst.bn.mean, _np(src.bn.mean)[k])
        _set(dst.bn.var, _np(src.bn.var)[k])
        prev, prev_live = k, live
    _copy_linear(new.head, model.head, rows=prev, row_scale=prev_live)
    return new, kept


def _revive(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kept CNN channels with a zero gate (rounding fill, or the one unit of an all-zero group).

    Folding a 0 gate into BN would give a constant-zero channel that the ReLU never lets
    train again. Instead it gets the mean of the layer's non-zero gates (1 if none) and the
    next layer reads it through zero weights (``live`` = 0): the same function, and a channel
    that fine-tuning can use (the next layer's weights get a gradient).
    """
    live = (a > 0).astype(np.float32)
    if live.all():
        return a, live
    fill = float(a[a > 0].mean()) if live.any() else 1.0
    return np.where(a > 0, a, fill).astype(a.dtype), live


def _extract_mlp(model: _g.GatedMLP, gates, keep):
    n = len(model.hidden)
    kept = {f"gates/{i}/alpha": keep(f"gates/{i}/alpha") for i in range(n)}
    widths = tuple(len(kept[f"gates/{i}/alpha"]) for i in range(n))
    prev, prev_scale = np.arange(model.in_features), None
    if model.ranks is None:
        new = _blank(lambda: MLP(model.in_features, widths, model.num_classes, rngs=nnx.Rngs(0)))
        dsts = list(new.layers)
        for i in range(n):
            k = kept[f"gates/{i}/alpha"]
            _copy_linear(dsts[i], model.layers[i], rows=prev, cols=k, row_scale=prev_scale)
            prev, prev_scale = k, gates[f"gates/{i}/alpha"][k]
        _copy_linear(dsts[-1], model.head, rows=prev, row_scale=prev_scale)
        return new, kept
    for i in range(n):
        kept[f"layers/{i}/alpha"] = keep(f"layers/{i}/alpha")
    ranks = tuple(len(kept[f"layers/{i}/alpha"]) for i in range(n))
    new = _blank(
        lambda: FactorizedMLP(model.in_features, widths, ranks, model.num_classes, rngs=nnx.Rngs(0))
    )
    for i in range(n):
        src, dst = model.layers[i], new.layers[i]
        k, r = kept[f"gates/{i}/alpha"], kept[f"layers/{i}/alpha"]
        u = _np(src.u)[prev][:, r]
        if prev_scale is not None:
            u = u * prev_scale[:, None]
        _set(dst.u, u)
        _set(dst.v, (_np(src.v)[r] * gates[f"layers/{i}/alpha"][r][:, None])[:, k])
        _set(dst.bias, _np(src.bias)[k])
        prev, prev_scale = k, gates[f"gates/{i}/alpha"][k]
    _copy_linear(new.head, model.head, rows=prev, row_scale=prev_scale)
    return new, kept


def _extract_transformer(model: _g.GatedTransformerClassifier, gates, keep):
    kept, heads, mlps = {}, [], []
    for i in range(model.num_layers):
        hk, fk = f"blocks/{i}/attn/head_gate/alpha", f"blocks/{i}/ffn_gate/alpha"
        kept[hk], kept[fk] = keep(hk), keep(fk)
        heads.append(len(kept[hk]))
        mlps.append(len(kept[fk]))
    new = _blank(
        lambda: SlimTransformerClassifier(
            model.vocab_size,
            model.num_classes,
            d_model=model.d_model,
            head_dim=model.head_dim,
            heads=heads,
            mlp_dims=mlps,
            max_len=model.max_len,
            dropout=model.dropout_rate,
            rngs=nnx.Rngs(0),
        )
    )
    _set(new.embed.embedding, _np(model.embed.embedding))
    _set(new.pos_embed, _np(model.pos_embed))
    dh = model.head_dim
    for i, (src, dst) in enumerate(zip(model.blocks, new.blocks, strict=True)):
        hk, fk = f"blocks/{i}/attn/head_gate/alpha", f"blocks/{i}/ffn_gate/alpha"
        h = kept[hk]
        cols = (h[:, None] * dh + np.arange(dh)[None]).reshape(-1)
        head_scale = np.repeat(gates[hk][h], dh)
        for name in ("q_proj", "k_proj", "v_proj"):
            _copy_linear(getattr(dst.attn, name), getattr(src.attn, name), cols=cols)
        _copy_linear(dst.attn.out_proj, src.attn.out_proj, rows=cols, row_scale=head_scale)
        f = kept[fk]
        _copy_linear(dst.mlp_in, src.mlp_in, cols=f)
        _copy_linear(dst.mlp_out, src.mlp_out, rows=f, row_scale=gates[fk][f])
        _copy_layernorm(dst.ln1, src.ln1)
        _copy_layernorm(dst.ln2, src.ln2)
    _copy_layernorm(new.final_ln, model.final_ln)
    _copy_linear(new.head, model.head)
    return new, kept


def _extract_lowrank(model: _g.LowRankLinear, gates, keep):
    r = keep("alpha")
    new = _blank(
        lambda: FactorizedLinear(
            model.in_features,
            model.out_features,
            len(r),
            use_bias=model.bias is not None,
            rngs=nnx.Rngs(0),
        )
    )
    _set(new.u, _np(model.u)[:, r])
    _set(new.v, _np(model.v)[r] * gates["alpha"][r][:, None])
    if model.bias is not None:
        _set(new.bias, _np(model.bias))
    return new, {"alpha": r}


def _extract_bits(model: _g.BitGatedDense, gates, keep):
    k = keep("alpha")
    codes, steps = _g.residual_levels(model.kernel[...], model.levels)
    new = LevelDense(
        model.in_features,
        model.out_features,
        len(k),
        max_levels=model.levels,
        use_bias=model.bias is not None,
    )
    _set(new.codes, np.asarray(codes)[k])
    _set(new.steps, np.asarray(steps)[k])
    _set(new.gains, gates["alpha"][k])
    if model.bias is not None:
        _set(new.bias, _np(model.bias))
    return new, {"alpha": k}


_EXTRACTORS = (
    (_g.GatedCNN, _extract_cnn),
    (_g.GatedMLP, _extract_mlp),
    (_g.GatedTransformerClassifier, _extract_transformer),
    (_g.LowRankLinear, _extract_lowrank),
    (_g.BitGatedDense, _extract_bits),
)


def extract(
    model: nnx.Module,
    *,
    gates: Mapping[str, Any] | nnx.State | None = None,
    tau: float = DEFAULT_TAU,
    multiple: int | Mapping[str, int] = 1,
    max_macs: float | None = None,
    budget_loss: Callable[[Mapping[str, np.ndarray]], float] | None = None,
    input_shape: Sequence[int] | None = None,
    latency_model: Any = None,
    pad_min_gain: float = PAD_MIN_GAIN,
) -> Extracted:
    """Threshold the gates, drop the removed units, fold the rest into the weights.

    Args:
      model: a :class:`~jaxcompress.latency.gates.GatedCNN`, ``GatedMLP`` (dense or low-rank),
        ``GatedTransformerClassifier``, ``LowRankLinear`` or ``BitGatedDense``. It is not
        modified.
      gates: optional gate values ``{name: array}`` (or an ``nnx.State`` holding the gates) to
        use instead of the model's own, e.g. from a checkpoint; names and shapes must match
        the model's (see :func:`~jaxcompress.latency.gates.gate_values`).
      tau: relative threshold (default ``1e-2``): keep ``alpha_j >= tau * max(alpha)``.
      multiple: round every group's kept count up to a multiple of this int (at most the
        group's size), or ``{group: int}`` for some groups (e.g. the channel groups of a CNN,
        not 4 attention heads), keeping the largest removed gates (:func:`kept_units`). Pass
        the same value to :func:`~jaxcompress.latency.surrogate_penalty` so a controller
        steers the cost of the rounded model.
      max_macs: optional cost ceiling (needs ``input_shape``): after rounding up, lower
        counts to smaller multiples, dropping the smallest kept gates, until the model's
        MACs (``cost_graph(model, input_shape)``) are at most this
        (:func:`fit_counts_to_budget`). Dropped units with non-zero gates change the
        function; fine-tune afterwards. Use it with a controller that steers the exact
        counts, to get both a hard budget and hardware-friendly widths.
      budget_loss: optional criterion for ``max_macs`` fitting: ``loss({group: kept
        indices})``, e.g. :func:`calibration_loss` on a batch of training data. By default
        the smallest relative gate mass is dropped per MAC saved.
      latency_model: optional :class:`~jaxcompress.latency.LatencyModel` of this model's
        graph, as measured (not its :meth:`~jaxcompress.latency.LatencyModel.monotone`
        envelope): after thresholding and rounding, widen every group to the widths at which
        it models the lowest latency among widths at least as large
        (:meth:`~jaxcompress.latency.LatencyModel.fastest_widths`), keeping the largest
        removed gates. A kernel can run faster at a wider width (XLA:CPU runs a 56-channel
        conv slower than a 64-channel one); with removed gates at 0 the added units are
        zero-padding and the function is unchanged. This is the width at which the envelope
        that steered a latency-form run was attained. Not with ``max_macs``.
      pad_min_gain: with ``latency_model``, widen only if the modelled latency drops by at
        least this fraction (default 0, ``PAD_MIN_GAIN``;
        :meth:`~jaxcompress.latency.LatencyModel.fastest_widths`).
      input_shape: one example's shape; when given, ``macs`` is counted exactly from the
        extracted model (:func:`~jaxcompress.latency.count_macs`). For a :class:`LevelDense`
        that is its plain multiply-adds; the bit-weighted cost is
        ``cost_graph(result.model, input_shape).dense()``.

    Returns:
      An :class:`Extracted` with the plain model (``SmallCNN``, ``MLP``, :class:`FactorizedMLP`,
      :class:`SlimTransformerClassifier`, :class:`FactorizedLinear` or :class:`LevelDense`).

    Raises:
      TypeError: an unsupported model; a ``latency_model`` that is not a ``LatencyModel``.
      ValueError: ``tau`` outside ``[0, 1)``; a bad ``multiple``; ``max_macs`` not a positive
        number, given without ``input_shape``, or below the cheapest rounded model, or given
        with ``latency_model``; a ``latency_model`` of other groups, or a bad ``pad_min_gain``;
        ``gates`` with missing/unexpected names or wrong shapes; negative or non-finite
        gates.
    """
    tau = _check_tau(tau)
    if max_macs is not None:
        if (
            isinstance(max_macs, bool)
            or not isinstance(max_macs, numbers.Real)
            or not math.isfinite(float(max_macs))
            or max_macs <= 0
        ):
            raise ValueError(f"max_macs must be a positive finite number, got {max_macs!r}")
        if input_shape is None:
            raise ValueError("max_macs needs input_shape (to count the model's MACs)")
    if budget_loss is not None and (max_macs is None or not callable(budget_loss)):
        raise ValueError(
            f"budget_loss must be a callable and needs max_macs, got budget_loss={budget_loss!r}, "
            f"max_macs={max_macs!r}"
        )
    fn = next((f for cls, f in _EXTRACTORS if isinstance(model, cls)), None)
    if fn is None:
        supported = ", ".join(c.__name__ for c, _ in _EXTRACTORS)
        raise TypeError(f"extract supports {supported}; got a {type(model).__name__}")
    values = _resolve_gates(model, gates)
    values = {k: np.asarray(v, np.float32) for k, v in values.items()}
    multiples = group_multiples(multiple, values)
    if latency_model is not None:
        _check_latency_model(latency_model, values, max_macs, pad_min_gain)

    kept_by_rule = {n: kept_units(v, tau, multiples[n]) for n, v in values.items()}
    if max_macs is not None:
        counts = fit_counts_to_budget(
            values,
            cost_graph(model, input_shape),
            {n: len(k) for n, k in kept_by_rule.items()},
            multiples,
            float(max_macs),
            loss=budget_loss,
        )
        kept_by_rule = {n: _top_units(values[n], c) for n, c in counts.items()}
    if latency_model is not None:
        counts = latency_model.fastest_widths(
            {n: len(k) for n, k in kept_by_rule.items()}, min_gain=pad_min_gain
        )
        kept_by_rule = {n: _widen(values[n], kept_by_rule[n], counts[n]) for n in values}

    def keep(name: str) -> np.ndarray:
        return kept_by_rule[name]

    new, kept = fn(model, values, keep)
    new.eval()
    macs = None
    if input_shape is not None:
        macs = count_macs(new, input_shape)
    return Extracted(new, kept, {k: len(v) for k, v in kept.items()}, macs)


# --------------------------------------------------------------------------------------------
# Timing and fine-tuning
# --------------------------------------------------------------------------------------------


def _is_token_model(model: nnx.Module) -> bool:
    return isinstance(model, (TransformerClassifier, _g._EncoderClassifier))


def measure_latency(
    model: nnx.Module,
    input_shape: Sequence[int],
    *,
    batch_size: int = 1,
    repeats: int = 50,
    warmup: int = 5,
    dtype: Any = None,
) -> float:
    """Median wall time (seconds) of the jitted eval-mode forward pass on the current device.

    The model is split once; ``jit(forward)(params, x)`` is compiled, run ``warmup`` times,
    then timed ``repeats`` times (each ending with ``block_until_ready``), via
    :func:`jaxcompress.spdy.time_callable`. ``x`` is zeros of ``(batch_size, *input_shape)``,
    or, for transformer classifiers, ``int32`` ones (token id 1 everywhere: no padding, since
    id 0 is padding).
    """
    from jaxcompress.spdy import time_callable

    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise TypeError(f"input_shape must be a tuple of ints, got {input_shape!r}")
    shape = check_int_tuple("input_shape", input_shape)
    batch_size = check_positive_int("batch_size", batch_size)
    token = _is_token_model(model)
    dtype = dtype or (jnp.int32 if token else jnp.float32)
    x = (jnp.ones if token else jnp.zeros)((batch_size, *shape), dtype)
    view = nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)
    graphdef, state = nnx.split(view)

    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    median, _ = time_callable(forward, (state, x), repeats=repeats, warmup=warmup)
    return median


def finetune(
    model: nnx.Module,
    train_ds: Any,
    *,
    epochs: int = 1,
    batch_size: int = 128,
    tx: optax.GradientTransformation | None = None,
    learning_rate: float = 1e-3,
    **fit_kwargs: Any,
):
    """Fine-tune an extracted model in place with :func:`jaxcompress.train.fit` (default
    ``optax.adam(learning_rate)``); returns the ``History``."""
    from jaxcompress.train import fit

    if tx is None:
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
        tx = optax.adam(learning_rate)
    return fit(model, tx, train_ds, epochs=epochs, batch_size=batch_size, **fit_kwargs)


# --------------------------------------------------------------------------------------------
# Uniform width multipliers
# --------------------------------------------------------------------------------------------


def scale_width(width: int, multiplier: float, *, min_width: int = 1) -> int:
    """``max(min_width, round(width * multiplier))``."""
    width = check_positive_int("width", width)
    if (
        isinstance(multiplier, bool)
        or not isinstance(multiplier, numbers.Real)
        or not (multiplier > 0)
    ):
        raise ValueError(f"multiplier must be a float > 0, got {multiplier!r}")
    return max(check_positive_int("min_width", min_width), round(width * float(multiplier)))


def uniform_width_models(
    model: nnx.Module,
    multipliers: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    *,
    rngs: nnx.Rngs,
) -> dict[float, nnx.Module]:
    """The uniform width-multiplier baseline (MobileNet/EfficientNet style): the same
    architecture family as ``model`` with every prunable width scaled by each multiplier,
    freshly initialised from ``rngs``.

    * ``GatedCNN`` / ``SmallCNN`` -> ``SmallCNN`` with scaled conv widths;
    * ``GatedMLP`` / ``MLP`` -> ``MLP`` (or :class:`FactorizedMLP`, ranks scaled too);
    * ``GatedTransformerClassifier`` / ``TransformerClassifier`` ->
      :class:`SlimTransformerClassifier` with scaled head counts and FFN widths (``head_dim``
      fixed).
    """
    check_rngs(rngs)
    mults = tuple(multipliers)
    if not mults:
        raise ValueError("multipliers must be non-empty")
    for m in mults:
        scale_width(1, m)  # validates
    out = {}
    for m in mults:
        if isinstance(model, (_g.GatedCNN, SmallCNN)):
            out[m] = SmallCNN(
                model.in_channels,
                model.num_classes,
                tuple(scale_width(w, m) for w in model.widths),
                strides=model.strides,
                pool_after=model.pool_after,
                rngs=rngs,
            )
        elif isinstance(model, (_g.GatedMLP, MLP, FactorizedMLP)):
            hidden = tuple(scale_width(w, m) for w in model.hidden)
            if not hidden:
                raise ValueError("an MLP without hidden layers has no width to scale")
            ranks = getattr(model, "ranks", None)
            if ranks is None:
                out[m] = MLP(model.in_features, hidden, model.num_classes, rngs=rngs)
            else:
                out[m] = FactorizedMLP(
                    model.in_features,
                    hidden,
                    tuple(scale_width(r, m) for r in ranks),
                    model.num_classes,
                    rngs=rngs,
                )
        elif isinstance(model, (_g._EncoderClassifier, TransformerClassifier)):
            if isinstance(model, TransformerClassifier):
                heads = (model.num_heads,) * model.num_layers
                mlps = (model.mlp_dim,) * model.num_layers
                head_dim = model.d_model // model.num_heads
            else:
                heads, mlps, head_dim = model.heads, model.mlp_dims, model.head_dim
            out[m] = SlimTransformerClassifier(
                model.vocab_size,
                model.num_classes,
                d_model=model.d_model,
                head_dim=head_dim,
                heads=tuple(scale_width(h, m) for h in heads),
                mlp_dims=tuple(scale_width(f, m) for f in mlps),
                max_len=model.max_len,
                dropout=model.dropout_rate,
                rngs=rngs,
            )
        else:
            raise TypeError(f"no width-multiplier family for a {type(model).__name__}")
    return out
