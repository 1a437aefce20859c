"""Non-negative per-unit gates and gated Flax NNX models for the l1/l2 latency surrogate.

Nasery, Shah, Suggala, Jain, "End-to-End Neural Network Compression via l1/l2 Regularized
Latency Surrogates", CVPRW 2024, arXiv:2306.05785. Every compressible unit ``j`` of a layer
``l`` (an output channel, a neuron, an attention head, a rank-1 component, a residual
quantization level) gets a gate :math:`\\alpha_{l,j} \\ge 0` that multiplies the unit's output.
The surrogate (:mod:`jaxcompress.latency.surrogate`) pushes whole groups of gates to zero;
:mod:`jaxcompress.latency.extract` then removes the zero units and folds the rest into the
weights.

Gates are :class:`Gate` variables, an ``nnx.Param`` subclass, so they train with the other
params (``jaxcompress.train.fit`` sees them) and can be selected by type:
``nnx.state(model, Gate)``. A gate carries one metadata field, ``parametrization``:

* ``"identity"`` (**default**): the stored value *is* the gate. Non-negativity is kept by
  :func:`project_nonnegative` at the end of the optax chain (a projected-gradient step). This
  is the default because it reaches exact zeros, so extraction of a unit removed by the
  projection changes nothing in the network's function.
* ``"softplus"``: the stored value ``theta`` is unconstrained and the gate is
  :math:`\\alpha = \\log(1 + e^{\\theta})`, positive by construction (never exactly zero; the
  extraction threshold decides). Which mechanism the paper uses is not verified (spec 4.2 (b)).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxcompress.masks import path_str
from jaxcompress.models._common import (
    BN_EPSILON,
    BN_MOMENTUM,
    check_image_batch,
    check_int_tuple,
    check_positive_int,
    check_rate,
    check_rngs,
    conv_kernel_init,
)

__all__ = [
    "PARAMETRIZATIONS",
    "BitGatedDense",
    "ChannelGate",
    "Gate",
    "GatedAttention",
    "GatedCNN",
    "GatedEncoderBlock",
    "GatedMLP",
    "GatedTransformerClassifier",
    "LowRankLinear",
    "ProjectState",
    "gate_effective",
    "gate_values",
    "project_nonnegative",
    "residual_levels",
]

PARAMETRIZATIONS = ("identity", "softplus")
PAD_ID = 0


class Gate(nnx.Param):
    """A non-negative per-unit gate (an ``nnx.Param`` subclass; select with ``nnx.state(m, Gate)``).

    Metadata ``parametrization`` (``"identity"`` or ``"softplus"``) says how the stored value
    maps to the gate; see the module docstring and :func:`gate_effective`.
    """


def _check_parametrization(value: object) -> str:
    if value not in PARAMETRIZATIONS:
        raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {value!r}")
    return str(value)


def gate_effective(raw: jax.Array, parametrization: str = "identity") -> jax.Array:
    """The gate value from the stored value: ``raw`` (identity) or ``softplus(raw)``."""
    _check_parametrization(parametrization)
    if parametrization == "softplus":
        return jax.nn.softplus(raw)
    return raw


def _raw_init(value: float, parametrization: str) -> float:
    """Stored value giving gate ``value``; softplus^{-1}(v) = log(expm1(v))."""
    if parametrization == "softplus":
        if value <= 0:
            raise ValueError(f"init must be > 0 with parametrization='softplus', got {value!r}")
        return math.log(math.expm1(value))
    return value


def _check_init(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"init must be a non-negative float, got {value!r}")
    if not math.isfinite(float(value)) or value < 0:
        raise ValueError(f"init must be a finite float >= 0, got {value!r}")
    return float(value)


def _new_gate(num: int, init: float, parametrization: str) -> Gate:
    raw = _raw_init(init, parametrization)
    return Gate(jnp.full((num,), raw, jnp.float32), parametrization=parametrization)


def _gate_of(var: Gate) -> jax.Array:
    return gate_effective(var[...], var.get_metadata().get("parametrization", "identity"))


class ChannelGate(nnx.Module):
    """``y[..., j] = alpha_j * x[..., j]``: one gate per output channel / neuron (last axis).

    Args:
      num: number of units.
      init: initial gate value (1.0: the gated model starts as the plain one).
      parametrization: ``"identity"`` (default, with :func:`project_nonnegative`) or
        ``"softplus"``.

    Attributes: ``alpha`` (:class:`Gate` of shape ``(num,)``).
    """

    def __init__(self, num: int, *, init: float = 1.0, parametrization: str = "identity"):
        self.num = check_positive_int("num", num)
        self.parametrization = _check_parametrization(parametrization)
        self.alpha = _new_gate(self.num, _check_init(init), self.parametrization)

    def values(self) -> jax.Array:
        """The effective (non-negative under the chosen mechanism) gates ``(num,)``."""
        return _gate_of(self.alpha)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.num:
            raise ValueError(f"ChannelGate({self.num}) got input with last axis {x.shape[-1]}")
        return x * self.values().astype(x.dtype)


class LowRankLinear(nnx.Module):
    """Low-rank Dense layer with gated rank-1 components:

    .. math::  y = x\\, U \\operatorname{diag}(\\alpha) V^\\top + b,

    stored in Flax layout as ``u`` ``(in, rank)`` and ``v`` ``(rank, out)`` (so ``V^T = v``).
    ``(x @ u) * alpha @ v`` costs ``(in + out) * ||alpha||_0`` multiply-adds per row.

    Attributes: ``u``, ``v`` (``nnx.Param``), ``alpha`` (:class:`Gate` ``(rank,)``), ``bias``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        use_bias: bool = True,
        init: float = 1.0,
        parametrization: str = "identity",
        rngs: nnx.Rngs,
    ):
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.rank = check_positive_int("rank", rank)
        self.parametrization = _check_parametrization(parametrization)
        check_rngs(rngs)
        # Each factor gets LeCun-normal scale so that u diag(1) v has the variance of a Dense
        # kernel with fan-in ``in``: Var(u) = 1/in, Var(v) = 1/rank.
        init_fn = nnx.initializers.lecun_normal()
        self.u = nnx.Param(init_fn(rngs.params(), (self.in_features, self.rank)))
        self.v = nnx.Param(init_fn(rngs.params(), (self.rank, self.out_features)))
        self.alpha = _new_gate(self.rank, _check_init(init), self.parametrization)
        self.bias = nnx.Param(jnp.zeros((self.out_features,))) if use_bias else None

    def values(self) -> jax.Array:
        return _gate_of(self.alpha)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = (x @ self.u[...]) * self.values().astype(x.dtype)
        y = h @ self.v[...]
        return y if self.bias is None else y + self.bias[...]


def residual_levels(w: jax.Array, levels: int) -> tuple[jax.Array, jax.Array]:
    """Ternary residual quantization planes of ``w``.

    With :math:`S = \\max|w|` and steps :math:`s_k = S / 2^{k-1}` (``k = 1..K``), the
    round-to-nearest quantizer :math:`q_k(w) = s_k \\operatorname{round}(w / s_k)` has
    :math:`2^k + 1` levels, and since :math:`s_{k-1} = 2 s_k` its increments are ternary:

    .. math::  q_k(w) - q_{k-1}(w) = s_k c_k,\\quad
               c_k = \\operatorname{round}(w/s_k) - 2 \\operatorname{round}(w/(2 s_k))
               \\in \\{-1, 0, 1\\},\\quad q_0 = 0,

    so :math:`\\sum_{k \\le m} s_k c_k = q_m(w)`: keeping the first ``m`` levels is the
    ``m``-level (``m``-"bit") quantization of ``w``.

    Returns:
      ``(codes, steps)``: ``int8[K, *w.shape]`` and ``float32[K]`` (no gradient).
    """
    levels = check_positive_int("levels", levels)
    w = jax.lax.stop_gradient(w)
    scale = jnp.maximum(jnp.max(jnp.abs(w)), jnp.finfo(w.dtype).tiny)
    steps = scale / (2.0 ** jnp.arange(levels, dtype=w.dtype))
    rounded = jnp.round(w[None] / steps.reshape((-1,) + (1,) * w.ndim))
    coarser = jnp.concatenate([jnp.zeros_like(rounded[:1]), rounded[:-1]], axis=0)
    codes = rounded - 2.0 * coarser
    return codes.astype(jnp.int8), steps


class BitGatedDense(nnx.Module):
    """A quantized Dense layer whose residual quantization levels are gated (active gates =
    bit-width).

    The kernel is :math:`W(\\alpha) = \\sum_{k=1}^{K} \\alpha_k s_k c_k(w)` with the ternary
    residual planes of :func:`residual_levels` on the latent full-precision kernel ``w``.
    With all gates 1 this is the ``K``-level quantization of ``w``; a gate at 0 removes its
    level. Keeping the first ``m`` levels is exactly the ``m``-level quantizer, so the number
    of active gates is the layer's bit-width (the extractor reports the index of the last kept
    level). ``w`` gets a straight-through gradient through the coarsest level:
    :math:`\\partial W / \\partial w = \\alpha_1` (the added term ``alpha_1 (w - sg(w))`` is
    exactly 0 in value, so the forward value is the quantized kernel bit for bit).

    Attributes: ``kernel`` (latent ``(in, out)``), ``alpha`` (:class:`Gate` ``(levels,)``),
    ``bias``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        levels: int = 8,
        *,
        use_bias: bool = True,
        init: float = 1.0,
        parametrization: str = "identity",
        rngs: nnx.Rngs,
    ):
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.levels = check_positive_int("levels", levels)
        self.parametrization = _check_parametrization(parametrization)
        check_rngs(rngs)
        self.kernel = nnx.Param(
            nnx.initializers.lecun_normal()(rngs.params(), (self.in_features, self.out_features))
        )
        self.alpha = _new_gate(self.levels, _check_init(init), self.parametrization)
        self.bias = nnx.Param(jnp.zeros((self.out_features,))) if use_bias else None

    def values(self) -> jax.Array:
        return _gate_of(self.alpha)

    def quantized_kernel(self) -> jax.Array:
        w = self.kernel[...]
        a = self.values().astype(w.dtype)
        codes, steps = residual_levels(w, self.levels)
        planes = steps.reshape((-1, 1, 1)) * codes.astype(w.dtype)
        kernel = planes[0] * a[0]
        for k in range(1, self.levels):  # fixed summation order, mirrored by the extractor
            kernel = kernel + planes[k] * a[k]
        return kernel + a[0] * (w - jax.lax.stop_gradient(w))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.quantized_kernel()
        return y if self.bias is None else y + self.bias[...]


# --------------------------------------------------------------------------------------------
# Gated models
# --------------------------------------------------------------------------------------------


def _pool_flags(pool_after: Sequence[bool] | None, n: int) -> tuple[bool, ...]:
    if pool_after is None:
        return tuple(i < n - 1 for i in range(n))
    if isinstance(pool_after, (str, bytes)) or not isinstance(pool_after, Sequence):
        raise TypeError(f"pool_after must be a sequence of bools, got {pool_after!r}")
    pool = tuple(bool(p) for p in pool_after)
    if len(pool) != n:
        raise ValueError(
            f"pool_after must have one entry per block (len(widths)={n}), got {pool_after!r}"
        )
    return pool


GATE_RMS_EPSILON = 1e-12
"""Added to ``mean(alpha**2)`` before the square root of :func:`gate_rms`."""


def gate_rms(alpha: jax.Array) -> jax.Array:
    """``sqrt(mean(alpha**2) + eps)``: the scale that a normalised gate vector divides by."""
    alpha = jnp.asarray(alpha)
    return jnp.sqrt(jnp.mean(jnp.square(alpha)) + GATE_RMS_EPSILON)


class GatedConvBlock(nnx.Module):
    """``relu(gate(BN(conv3x3(x))))``; the gate after BN folds into BN's ``scale``/``bias``.

    With ``normalize=True`` the block uses the normalised gates ``alpha / gate_rms(alpha)``.
    The overall scale of ``alpha`` then has no effect on the output; only the relative sizes
    matter, as they already do for a block whose output feeds another conv and BatchNorm.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        stride: int = 1,
        *,
        parametrization: str,
        normalize: bool = False,
        rngs: nnx.Rngs,
    ):
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {normalize!r}")
        self.normalize = normalize
        self.conv = nnx.Conv(
            in_features,
            out_features,
            (3, 3),
            strides=(stride, stride),
            padding="SAME",
            use_bias=False,
            kernel_init=conv_kernel_init,
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(out_features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)
        self.gate = ChannelGate(out_features, parametrization=parametrization)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.gate(self.bn(self.conv(x)))
        if self.normalize:
            h = h / gate_rms(self.gate.values()).astype(h.dtype)
        return jax.nn.relu(h)


class GatedCNN(nnx.Module):
    """Channel-gated BN CNN (Fashion-MNIST): per block conv3x3 (stride ``strides[l]``, SAME)
    -> BN -> gate -> relu, a 2x2 max pool after every block whose ``pool_after`` flag is set,
    global average pooling, Dense head. The layout and the defaults mirror
    :class:`jaxcompress.models.SmallCNN` (``strides=None``: ``(2, 1, 1, ...)``; ``pool_after=
    None``: all blocks but the last), and it extracts to a ``SmallCNN`` with per-layer widths
    (gates folded into BN; strides and pooling passed explicitly).

    Cost (multiply-adds per example, input ``H x W x C``): block ``l`` with output size
    ``H_l x W_l`` costs ``9 H_l W_l c_{l-1} c_l``; the head ``c_L * num_classes``. With the
    defaults on 28x28x1 the blocks run at 14, 7, 4 and 2 pixels (1,845,632 MACs).

    Gate names (see :func:`gate_values`): ``blocks/{l}/gate/alpha``.

    ``normalize_last=True`` normalises the gates of the last block (:class:`GatedConvBlock`).
    Every other block feeds a conv and a BatchNorm, which remove the scale of its gates. The
    last block feeds global pooling and the head directly. There, without normalisation, the
    common scale of its gates acts as a logit temperature: training grows all of them
    together. The scale-invariant l1/l2 ratio is stationary at equal gates, so it then never
    prunes that block. Extraction folds ``alpha_j / gate_rms(alpha)`` into BN, exactly.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (32, 64, 64, 128),
        *,
        strides: Sequence[int] | None = None,
        pool_after: Sequence[bool] | None = None,
        parametrization: str = "identity",
        normalize_last: bool = False,
        rngs: nnx.Rngs,
    ):
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.widths = check_int_tuple("widths", widths)
        self.pool_after = _pool_flags(pool_after, len(self.widths))
        if strides is None:
            self.strides = (2,) + (1,) * (len(self.widths) - 1)
        else:
            self.strides = check_int_tuple("strides", strides)
            if len(self.strides) != len(self.widths):
                raise ValueError(
                    f"strides must have one entry per block (len(widths)={len(self.widths)}), "
                    f"got {strides!r}"
                )
        self.parametrization = _check_parametrization(parametrization)
        check_rngs(rngs)
        chans = (self.in_channels, *self.widths)
        if not isinstance(normalize_last, bool):
            raise TypeError(f"normalize_last must be a bool, got {normalize_last!r}")
        last = len(self.widths) - 1
        self.blocks = nnx.List(
            [
                GatedConvBlock(
                    a,
                    b,
                    st,
                    parametrization=self.parametrization,
                    normalize=normalize_last and i == last,
                    rngs=rngs,
                )
                for i, (a, b, st) in enumerate(
                    zip(chans[:-1], chans[1:], self.strides, strict=True)
                )
            ]
        )
        self.head = nnx.Linear(self.widths[-1], self.num_classes, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        check_image_batch("GatedCNN", x, self.in_channels)
        for block, pool in zip(self.blocks, self.pool_after, strict=True):
            x = block(x)
            if pool:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        return jnp.mean(x, axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


class GatedMLP(nnx.Module):
    """Neuron-gated ReLU MLP, optionally with low-rank gated hidden layers.

    ``h_{l+1} = alpha_l * relu(layer_l(h_l))`` for the hidden layers; the head is a plain
    Dense. With ``ranks=None`` every hidden layer is an ``nnx.Linear`` and the model extracts
    to :class:`jaxcompress.models.MLP` (neuron gates folded into the next layer's rows: exact
    because the gate follows the activation). With ``ranks`` (one per hidden layer) the hidden
    layers are :class:`LowRankLinear` with rank gates too, and extraction gives a
    :class:`jaxcompress.latency.extract.FactorizedMLP`.

    Gate names: ``gates/{l}/alpha`` (neurons), ``layers/{l}/alpha`` (ranks).
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (300, 100),
        num_classes: int = 10,
        *,
        ranks: Sequence[int] | None = None,
        parametrization: str = "identity",
        rngs: nnx.Rngs,
    ):
        self.in_features = check_positive_int("in_features", in_features)
        self.hidden = check_int_tuple("hidden", hidden)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.parametrization = _check_parametrization(parametrization)
        if ranks is not None:
            ranks = check_int_tuple("ranks", ranks)
            if len(ranks) != len(self.hidden):
                raise ValueError(
                    f"ranks must have one entry per hidden layer ({len(self.hidden)}), got {ranks}"
                )
        self.ranks = ranks
        check_rngs(rngs)
        sizes = (self.in_features, *self.hidden)
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            if ranks is None:
                layers.append(nnx.Linear(a, b, rngs=rngs))
            else:
                layers.append(
                    LowRankLinear(a, b, ranks[i], parametrization=self.parametrization, rngs=rngs)
                )
        self.layers = nnx.List(layers)
        self.gates = nnx.List(
            [ChannelGate(b, parametrization=self.parametrization) for b in self.hidden]
        )
        self.head = nnx.Linear(self.hidden[-1], self.num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.in_features:
            raise ValueError(
                f"GatedMLP expects x of shape (N, ...) with {self.in_features} features per "
                f"example, got shape {x.shape}"
            )
        h = jnp.reshape(x, (x.shape[0], self.in_features))
        for layer, gate in zip(self.layers, self.gates, strict=True):
            h = gate(jax.nn.relu(layer(h)))
        return self.head(h)


class GatedAttention(nnx.Module):
    """Multi-head self-attention with one gate per head on the head's output:

    .. math::
        o_h = \\alpha_h \\operatorname{softmax}\\big(Q_h K_h^\\top / \\sqrt{d_h} + M\\big) V_h,
        \\qquad y = [o_1, \\dots, o_H] W_O + b_O.

    ``q_proj``/``k_proj``/``v_proj`` are Dense ``(d_model, H d_h)`` (head-major columns),
    ``out_proj`` is Dense ``(H d_h, d_model)``. With ``gated=False`` (the plain, extracted
    form) there are no gates.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: int,
        dropout: float,
        *,
        gated: bool = True,
        parametrization: str = "identity",
        rngs: nnx.Rngs,
    ):
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
        inner = num_heads * head_dim
        self.q_proj = nnx.Linear(d_model, inner, rngs=rngs)
        self.k_proj = nnx.Linear(d_model, inner, rngs=rngs)
        self.v_proj = nnx.Linear(d_model, inner, rngs=rngs)
        self.out_proj = nnx.Linear(inner, d_model, rngs=rngs)
        self.attn_dropout = nnx.Dropout(dropout, rngs=rngs)
        self.head_gate = ChannelGate(num_heads, parametrization=parametrization) if gated else None

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        n, length, _ = x.shape
        shape = (n, length, self.num_heads, self.head_dim)
        q = jnp.reshape(self.q_proj(x), shape)
        k = jnp.reshape(self.k_proj(x), shape)
        v = jnp.reshape(self.v_proj(x), shape)
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k) / jnp.sqrt(float(self.head_dim))
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        weights = self.attn_dropout(jax.nn.softmax(scores, axis=-1))
        o = jnp.einsum("nhqk,nkhd->nqhd", weights, v)
        if self.head_gate is not None:
            o = o * self.head_gate.values().astype(o.dtype)[:, None]
        return self.out_proj(jnp.reshape(o, (n, length, self.num_heads * self.head_dim)))


class GatedEncoderBlock(nnx.Module):
    """Pre-LN encoder block with head gates and FFN neuron gates (after the GELU):

    ``h = x + Drop(GatedMHA(LN1(x)))``, ``y = h + Drop(W2 Drop(alpha * gelu(W1 LN2(h))))``.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: int,
        mlp_dim: int,
        dropout: float,
        *,
        gated: bool = True,
        parametrization: str = "identity",
        rngs: nnx.Rngs,
    ):
        self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = GatedAttention(
            d_model,
            num_heads,
            head_dim,
            dropout,
            gated=gated,
            parametrization=parametrization,
            rngs=rngs,
        )
        self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.mlp_in = nnx.Linear(d_model, mlp_dim, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_dim, d_model, rngs=rngs)
        self.ffn_gate = ChannelGate(mlp_dim, parametrization=parametrization) if gated else None
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.dropout(self.attn(self.ln1(x), mask))
        h = jax.nn.gelu(self.mlp_in(self.ln2(x)))
        if self.ffn_gate is not None:
            h = self.ffn_gate(h)
        return x + self.dropout(self.mlp_out(self.dropout(h)))


class _EncoderClassifier(nnx.Module):
    """Shared body of the gated and the slim (extracted) transformer classifiers."""

    def _build(
        self,
        vocab_size,
        num_classes,
        d_model,
        head_dim,
        heads,
        mlp_dims,
        max_len,
        dropout,
        gated,
        parametrization,
        rngs,
    ):
        self.vocab_size = check_positive_int("vocab_size", vocab_size)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.d_model = check_positive_int("d_model", d_model)
        self.head_dim = check_positive_int("head_dim", head_dim)
        self.heads = check_int_tuple("heads", heads)
        self.mlp_dims = check_int_tuple("mlp_dims", mlp_dims)
        if len(self.heads) != len(self.mlp_dims):
            raise ValueError(
                f"heads and mlp_dims need one entry per layer, got {self.heads} and {self.mlp_dims}"
            )
        self.max_len = check_positive_int("max_len", max_len)
        self.dropout_rate = check_rate("dropout", dropout)
        check_rngs(rngs)
        self.embed = nnx.Embed(
            self.vocab_size, self.d_model, embedding_init=nnx.initializers.normal(0.02), rngs=rngs
        )
        self.pos_embed = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (self.max_len, self.d_model))
        )
        self.embed_dropout = nnx.Dropout(self.dropout_rate, rngs=rngs)
        self.blocks = nnx.List(
            [
                GatedEncoderBlock(
                    self.d_model,
                    h,
                    self.head_dim,
                    m,
                    self.dropout_rate,
                    gated=gated,
                    parametrization=parametrization,
                    rngs=rngs,
                )
                for h, m in zip(self.heads, self.mlp_dims, strict=True)
            ]
        )
        self.final_ln = nnx.LayerNorm(self.d_model, rngs=rngs)
        self.head = nnx.Linear(self.d_model, self.num_classes, rngs=rngs)

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    def features(self, tokens: jax.Array) -> jax.Array:
        """Masked-mean-pooled features ``(N, d_model)`` before the head."""
        name = type(self).__name__
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"{name} expects integer tokens of shape (N, L), got shape {tokens.shape} and "
                f"dtype {tokens.dtype}"
            )
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(
                f"{name} was built with max_len={self.max_len}, got sequences of length {length}"
            )
        valid = tokens != PAD_ID
        x = self.embed(tokens) + self.pos_embed[...][:length]
        x = self.embed_dropout(x)
        attn_mask = valid[:, None, None, :]
        for block in self.blocks:
            x = block(x, attn_mask)
        x = self.final_ln(x)
        weights = valid.astype(x.dtype)[..., None]
        return jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.head(self.features(tokens))


class GatedTransformerClassifier(_EncoderClassifier):
    """Transformer encoder classifier with attention-head and FFN-neuron gates.

    Same constructor and call API as :class:`jaxcompress.models.TransformerClassifier`
    (token ids ``(N, L)`` with padding id 0 -> logits; pre-LN blocks, learned positions,
    masked mean pooling), plus ``parametrization``. Each block gates its ``num_heads`` head
    outputs (``blocks/{l}/attn/head_gate/alpha``) and its ``mlp_dim`` FFN neurons
    (``blocks/{l}/ffn_gate/alpha``). Extracts to
    :class:`jaxcompress.latency.extract.SlimTransformerClassifier` with per-layer head counts
    and FFN widths (head gates folded into the output-projection rows, FFN gates into
    ``mlp_out`` rows).
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int = 2,
        *,
        d_model: int = 128,
        num_heads: int = 4,
        num_layers: int = 2,
        mlp_dim: int = 256,
        max_len: int = 64,
        dropout: float = 0.1,
        parametrization: str = "identity",
        rngs: nnx.Rngs,
    ):
        d_model = check_positive_int("d_model", d_model)
        num_heads = check_positive_int("num_heads", num_heads)
        if d_model % num_heads:
            raise ValueError(
                f"d_model must be divisible by num_heads, got d_model={d_model!r}, "
                f"num_heads={num_heads!r}"
            )
        num_layers = check_positive_int("num_layers", num_layers)
        mlp_dim = check_positive_int("mlp_dim", mlp_dim)
        self.num_heads, self.mlp_dim = num_heads, mlp_dim
        self.parametrization = _check_parametrization(parametrization)
        self._build(
            vocab_size,
            num_classes,
            d_model,
            d_model // num_heads,
            (num_heads,) * num_layers,
            (mlp_dim,) * num_layers,
            max_len,
            dropout,
            True,
            self.parametrization,
            rngs,
        )


# --------------------------------------------------------------------------------------------
# Reading gates and keeping them non-negative
# --------------------------------------------------------------------------------------------


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def gate_values(tree: Any) -> dict[str, jax.Array]:
    """Effective gates ``{name: (units,) array}`` of a model, a state or a plain mapping.

    * ``nnx.Module``: its :class:`Gate` variables, named by module path
      (``"blocks/0/gate/alpha"``); the parametrization is applied.
    * ``nnx.State`` / any pytree holding ``nnx.Variable`` leaves (e.g. the ``params`` of
      :func:`jaxcompress.train.split_model`, or its gradients): its :class:`Gate` leaves.
    * A plain mapping ``{name: array}`` (no Variables): returned as a dict of arrays, read as
      gate values already (identity).

    Pure and jit-friendly: the names come from the tree structure.
    """
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, Gate)
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_var)[0]
    if any(_is_var(leaf) for _, leaf in leaves):
        return {path_str(p): _gate_of(leaf) for p, leaf in leaves if isinstance(leaf, Gate)}
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            if not isinstance(k, str):
                raise TypeError(f"gate mapping keys must be strings, got {k!r}")
            arr = jnp.asarray(v)
            if arr.ndim != 1:
                raise ValueError(f"gate {k!r} must be a 1-D array, got shape {arr.shape}")
            out[k] = arr
        return out
    raise TypeError(
        f"expected an nnx.Module, an nnx.State with Gate variables or a mapping name -> gates, "
        f"got {type(tree).__name__}"
    )


class ProjectState(NamedTuple):
    """:func:`project_nonnegative` is stateless."""


def project_nonnegative(
    where: Callable[[str, Any], bool] | None = None,
    *,
    prune_below: float = 0.0,
) -> optax.GradientTransformation:
    """Keep gates non-negative after the update (projected gradient), inside an optax chain.

    Put it **last** in the chain. For every selected leaf the update ``u`` is replaced by

    .. math::  u' = \\max(u, -\\theta),\\qquad \\text{so}\\quad \\theta + u' = \\max(\\theta + u, 0)

    exactly in floating point (``theta + (-theta) = 0``): the Euclidean projection of the
    unconstrained step onto :math:`\\alpha \\ge 0`. Other leaves pass through unchanged.

    With ``prune_below = tau > 0`` the step also sets to zero every gate of a leaf that would
    end below ``tau`` times the leaf's largest gate (``u' = -theta`` there): the units that
    :func:`~jaxcompress.latency.extract` would remove at the same ``tau`` are removed during
    training, so the network adapts to their loss and extraction changes nothing. A gate
    set to zero in front of a ReLU receives no gradient and stays zero. The l1/l2 ratio
    makes gates unequal rather than zero (a continuum of small gates), which is where this
    matters; it is a hard-threshold step, not a projection onto a convex set.

    Args:
      where: ``where(path, leaf) -> bool`` selecting leaves of a plain pytree (``path`` as
        ``"a/b/0/c"``). Default: every :class:`Gate` with the ``"identity"`` parametrization
        (softplus gates are positive already and are left alone).
      prune_below: relative threshold in ``[0, 1)``; 0 (default) only projects onto
        :math:`\\alpha \\ge 0`. A 0-d float array is accepted, so
        ``optax.inject_hyperparams`` can inject it; it is checked by shape and dtype only (it
        may be traced), not by value.

    Raises:
      ValueError: ``prune_below`` outside ``[0, 1)``; in ``update`` if ``params`` is not
        given.
    """
    if where is not None and not callable(where):
        raise TypeError(f"where must be callable (path, leaf) -> bool or None, got {where!r}")
    if isinstance(prune_below, numbers.Real) and not isinstance(prune_below, bool):
        if not 0.0 <= prune_below < 1.0:
            raise ValueError(f"prune_below must be a float in [0, 1), got {prune_below!r}")
        prune_below = float(prune_below)
        threshold = prune_below > 0.0
    elif (
        hasattr(prune_below, "shape")
        and hasattr(prune_below, "dtype")
        and jnp.ndim(prune_below) == 0
        and jnp.issubdtype(prune_below.dtype, jnp.floating)
    ):
        # e.g. injected by optax.inject_hyperparams (possibly traced): checked by shape/dtype
        threshold = True
    else:
        raise ValueError(
            f"prune_below must be a float in [0, 1) or a 0-d float array, got {prune_below!r}"
        )

    def init_fn(params):
        del params
        return ProjectState()

    def select(path, leaf) -> bool:
        if where is not None:
            return bool(where(path_str(path), leaf))
        return (
            isinstance(leaf, Gate)
            and leaf.get_metadata().get("parametrization", "identity") == "identity"
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "project_nonnegative needs params: call update(updates, state, params)"
            )

        def step(u, p):
            out = jnp.maximum(u, -p)
            if threshold:  # an array prune_below of 0 cuts nothing: p + out >= 0
                after = p + out
                cut = after < prune_below * jnp.max(after)
                out = jnp.where(cut, -p, out)
            return out.astype(u.dtype)

        def proj(path, u, p):
            if not select(path, p):
                return u
            if _is_var(u):
                return u.replace(step(u[...], p[...]))
            return step(u, p)

        new = jax.tree_util.tree_map_with_path(proj, updates, params, is_leaf=_is_var)
        return new, state

    return optax.GradientTransformation(init_fn, update_fn)
