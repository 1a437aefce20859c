"""Scaled dot-product attention shared by :class:`~jaxcompress.models.GPT` (causal) and
:class:`~jaxcompress.models.TransformerClassifier` (key-padding mask)."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None = None,
    *,
    causal: bool = False,
    dropout: Callable[[jax.Array], jax.Array] | None = None,
    prescale: bool = True,
) -> jax.Array:
    r"""Multi-head scaled dot-product attention (Vaswani et al., 2017, arXiv:1706.03762).

    For each head :math:`h` with queries :math:`Q_h`, keys :math:`K_h`, values :math:`V_h` of
    width :math:`d_h`:

    .. math::
        A_h = \operatorname{softmax}\Bigl(\frac{Q_h K_h^\top}{\sqrt{d_h}} + C\Bigr),\qquad
        y_h = \mathrm{Drop}(A_h)\, V_h,

    with :math:`C_{ts} = -\infty` where ``mask`` is ``False`` or, when ``causal``, where
    :math:`s > t` (the float32 minimum, so a fully masked row stays finite: it averages all
    values uniformly). Scores and softmax are float32; the weights are cast back to
    ``value.dtype``.

    Args:
      query: ``(..., T, H, d_h)``.
      key: ``(..., S, H, d_h)``.
      value: ``(..., S, H, d_v)``.
      mask: optional boolean mask broadcastable to ``(..., H, T, S)``; ``True`` attends.
      causal: also mask every key after its query (position ``s > t``).
      dropout: optional function applied to the attention weights ``(..., H, T, S)``
        (e.g. an ``nnx.Dropout``); ``None`` applies none.
      prescale: divide the queries by :math:`\sqrt{d_h}` before the product (Flax's order,
        used by ``TransformerClassifier``) rather than the scores after it (nanoGPT's order,
        used by ``GPT``). The two are equal in exact arithmetic and differ by float rounding;
        each model keeps its order so that its outputs do not change.

    Returns:
      ``(..., T, H, d_v)``.
    """
    if prescale:
        query = query / jnp.sqrt(query.shape[-1]).astype(query.dtype)
    scores = jnp.einsum("...qhd,...khd->...hqk", query, key).astype(jnp.float32)
    if not prescale:
        scores = scores / math.sqrt(query.shape[-1])
    if causal:
        t, s = scores.shape[-2:]
        lower = jnp.tril(jnp.ones((t, s), dtype=bool))
        mask = lower if mask is None else jnp.logical_and(mask, lower)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    if dropout is not None:
        weights = dropout(weights)
    return jnp.einsum("...hqk,...khd->...qhd", weights, value)


def flax_attention_fn(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None = None,
    *,
    dropout_rng: jax.Array | None = None,
    dropout_rate: float = 0.0,
    broadcast_dropout: bool = True,
    deterministic: bool = False,
    dtype=None,
    precision=None,
    module=None,
    is_causal: bool = False,
) -> jax.Array:
    """:func:`dot_product_attention` with the ``attention_fn`` signature of
    ``nnx.MultiHeadAttention``; its dropout is Flax's (a Bernoulli keep mask drawn from
    ``dropout_rng``, shared over batch and heads when ``broadcast_dropout``, scaled by
    ``1 / keep``).

    ``dtype``, ``precision`` and ``module`` (weight sowing) are not supported: a value other
    than ``None`` raises ``ValueError``.
    """
    for name, arg in (("dtype", dtype), ("precision", precision), ("module", module)):
        if arg is not None:
            raise ValueError(
                f"jaxcompress attention does not support MultiHeadAttention {name}=, got {arg!r}"
            )
    dropout = None
    if not deterministic and dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError("dropout_rng is required when dropout_rate > 0 and not deterministic")
        keep_prob = 1.0 - dropout_rate

        def dropout(weights: jax.Array) -> jax.Array:
            shape = weights.shape
            if broadcast_dropout:
                shape = (1,) * (weights.ndim - 2) + shape[-2:]
            keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
            return weights * (keep.astype(weights.dtype) / jnp.asarray(keep_prob, weights.dtype))

    return dot_product_attention(query, key, value, mask, causal=is_causal, dropout=dropout)
