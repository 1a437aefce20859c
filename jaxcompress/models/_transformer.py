"""Pre-LN Transformer encoder for sequence classification (token ids in, logits out)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcompress._checks import check_fraction, check_int
from jaxcompress.models._attention import flax_attention_fn
from jaxcompress.models._common import (
    check_heads,
    check_rngs,
    embed_tokens,
    token_embeddings,
)

PAD_ID = 0


class EncoderBlock(nnx.Module):
    """Pre-LN encoder block (Xiong et al., 2020, "On Layer Normalization in the Transformer
    Architecture", arXiv:2002.04745):

    .. math::
        h = x + \\mathrm{Drop}(\\mathrm{MHA}(\\mathrm{LN}_1(x), \\text{mask})),\\qquad
        y = h + \\mathrm{Drop}(W_2\\, \\mathrm{Drop}(\\operatorname{gelu}(W_1 \\mathrm{LN}_2(h)))).

    Attributes: ``ln1``, ``attn`` (``nnx.MultiHeadAttention``), ``ln2``, ``mlp_in``
    (``(d_model, mlp_dim)``), ``mlp_out`` (``(mlp_dim, d_model)``), ``dropout``.
    Call: ``x`` ``(N, L, d_model)``, ``mask`` broadcastable to ``(N, heads, L, L)`` ->
    ``(N, L, d_model)``.
    """

    def __init__(
        self, d_model: int, num_heads: int, mlp_dim: int, dropout: float, *, rngs: nnx.Rngs
    ):
        self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=num_heads,
            in_features=d_model,
            dropout_rate=dropout,
            deterministic=False,
            decode=False,
            attention_fn=flax_attention_fn,
            rngs=rngs,
        )
        self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.mlp_in = nnx.Linear(d_model, mlp_dim, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_dim, d_model, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.dropout(self.attn(self.ln1(x), mask=mask))
        h = self.dropout(jax.nn.gelu(self.mlp_in(self.ln2(x))))
        return x + self.dropout(self.mlp_out(h))


class TransformerClassifier(nnx.Module):
    """Transformer encoder classifier (Vaswani et al., 2017, arXiv:1706.03762) with pre-LN
    blocks, learned positions and masked mean pooling.

    For token ids ``t`` of shape ``(N, L)``, ``L <= max_len``, with padding id 0 and
    :math:`m_{n,l} = [t_{n,l} \\ne 0]`:

    .. math::
        x^{(0)}_{n,l} = E[t_{n,l}] + P[l],\\quad
        x^{(k+1)} = \\mathrm{Block}_k(x^{(k)}, m),\\quad
        z_n = \\frac{\\sum_l m_{n,l}\\, \\mathrm{LN}(x^{(K)})_{n,l}}{\\max(1, \\sum_l m_{n,l})},
        \\quad \\text{logits}_n = W z_n + b.

    Attention never attends to padded keys; an all-padding row pools to zero features.

    Args:
      vocab_size: embedding rows (ids ``0 .. vocab_size - 1``; id 0 is padding).
      num_classes: number of logits.
      d_model: model width (divisible by ``num_heads``).
      num_heads: attention heads.
      num_layers: encoder blocks.
      mlp_dim: hidden width of the feed-forward sublayer.
      max_len: longest sequence (rows of the position table).
      dropout: dropout rate on embeddings, attention weights and residual branches; active
        only in ``model.train()`` mode.
      rngs: ``nnx.Rngs`` with a ``params`` stream (default stream suffices) and, for dropout in
        train mode, a ``dropout`` stream (falls back to the default stream).

    Attributes: ``embed`` (``nnx.Embed``, ``(vocab_size, d_model)``), ``pos_embed``
    (``nnx.Param`` ``(max_len, d_model)``), ``blocks``, ``final_ln``, ``head``.
    Call: int tokens ``(N, L)`` -> logits ``(N, num_classes)``.
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
        rngs: nnx.Rngs,
    ):
        self.vocab_size = check_int("vocab_size", vocab_size)
        self.num_classes = check_int("num_classes", num_classes)
        self.d_model, self.num_heads = check_heads(d_model, num_heads)
        self.num_layers = check_int("num_layers", num_layers)
        self.mlp_dim = check_int("mlp_dim", mlp_dim)
        self.max_len = check_int("max_len", max_len)
        self.dropout_rate = check_fraction("dropout", dropout, interval="[0, 1)")
        check_rngs(rngs)
        self.embed, self.pos_embed, self.embed_dropout = token_embeddings(
            self.vocab_size, self.max_len, self.d_model, self.dropout_rate, rngs
        )
        self.blocks = nnx.List(
            [
                EncoderBlock(
                    self.d_model, self.num_heads, self.mlp_dim, self.dropout_rate, rngs=rngs
                )
                for _ in range(self.num_layers)
            ]
        )
        self.final_ln = nnx.LayerNorm(self.d_model, rngs=rngs)
        self.head = nnx.Linear(self.d_model, self.num_classes, rngs=rngs)

    def features(self, tokens: jax.Array) -> jax.Array:
        """Masked-mean-pooled features ``(N, d_model)`` before the head."""
        x = embed_tokens(self, tokens, "max_len", self.max_len)
        valid = tokens != PAD_ID  # (N, L)
        attn_mask = valid[:, None, None, :]  # keys only: (N, 1, 1, L) -> (N, heads, L, L)
        for block in self.blocks:
            x = block(x, attn_mask)
        x = self.final_ln(x)
        weights = valid.astype(x.dtype)[..., None]
        return jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.head(self.features(tokens))
