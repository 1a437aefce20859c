"""Model-specific argument checks and initialisers for the Flax NNX models (the generic
checks are :mod:`jaxcompress._checks`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcompress._checks import check_int

# He et al. (2015), "Delving Deep into Rectifiers", arXiv:1502.01852: N(0, 2 / fan_out) keeps the
# variance of the back-propagated signal constant through ReLU convolutions.
conv_kernel_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

# Flax's BatchNorm momentum is the weight of the *old* running statistic; 0.9 is PyTorch's 0.1.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def check_int_tuple(name: str, value: object, *, allow_empty: bool = False) -> tuple[int, ...]:
    """Return ``value`` as a tuple of positive ints or raise naming ``name``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of positive ints, got {value!r}")
    out = tuple(check_int(f"{name}[{i}]", v) for i, v in enumerate(value))
    if not out and not allow_empty:
        raise ValueError(f"{name} must hold at least one positive int, got {value!r}")
    return out


def check_rngs(rngs: object) -> nnx.Rngs:
    """Raise ``TypeError`` unless ``rngs`` is an ``nnx.Rngs``."""
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"rngs must be an flax.nnx.Rngs, got {type(rngs).__name__}")
    return rngs


def check_image_batch(name: str, x: jax.Array, in_channels: int) -> None:
    """Check a static NHWC shape ``(N, H, W, in_channels)``; shapes are static under ``jit``."""
    if x.ndim != 4 or x.shape[-1] != in_channels:
        raise ValueError(
            f"{name} expects an NHWC batch of shape (N, H, W, {in_channels}), got shape {x.shape}"
        )


def check_heads(d_model: object, num_heads: object) -> tuple[int, int]:
    """Return ``(d_model, num_heads)`` as positive ints with ``d_model % num_heads == 0``."""
    d = check_int("d_model", d_model)
    h = check_int("num_heads", num_heads)
    if d % h:
        raise ValueError(
            f"d_model must be divisible by num_heads, got d_model={d_model!r}, "
            f"num_heads={num_heads!r}"
        )
    return d, h


class _TokenModel(Protocol):
    embed: nnx.Embed
    pos_embed: nnx.Param
    embed_dropout: nnx.Dropout


def token_embeddings(
    vocab_size: int, length: int, d_model: int, rate: float, rngs: nnx.Rngs
) -> tuple[nnx.Embed, nnx.Param, nnx.Dropout]:
    """``(embed, pos_embed, embed_dropout)`` for :func:`embed_tokens`: token embeddings
    ``(vocab_size, d_model)`` and position embeddings ``(length, d_model)``, both drawn from
    ``N(0, 0.02^2)`` in that order, and dropout at ``rate``."""
    init = nnx.initializers.normal(0.02)
    embed = nnx.Embed(vocab_size, d_model, embedding_init=init, rngs=rngs)
    pos_embed = nnx.Param(init(rngs.params(), (length, d_model)))
    return embed, pos_embed, nnx.Dropout(rate, rngs=rngs)


def embed_tokens(model: _TokenModel, tokens: jax.Array, limit_name: str, limit: int) -> jax.Array:
    """Token plus learned position embeddings, with embedding dropout, of a 2-D integer batch.

    ``model`` has ``embed`` (``nnx.Embed``), ``pos_embed`` (``nnx.Param`` ``(limit, d)``) and
    ``embed_dropout``. Raises ``ValueError`` naming the model unless ``tokens`` is an integer
    ``(batch, length)`` array with ``length <= limit`` (the model's ``limit_name``).
    """
    name = type(model).__name__
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"{name} expects integer tokens of shape (batch, length), got shape {tokens.shape} "
            f"and dtype {tokens.dtype}"
        )
    length = tokens.shape[1]
    if length > limit:
        raise ValueError(
            f"{name} was built with {limit_name}={limit}, got sequences of length {length} "
            f"(tokens shape {tokens.shape})"
        )
    x = model.embed(tokens) + model.pos_embed[...][:length]
    return model.embed_dropout(x)
