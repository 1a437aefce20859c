"""Decoder-only GPT language model (token ids in, next-token logits out) and a jitted sampler."""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcompress._checks import check_fraction, check_int
from jaxcompress.models._attention import dot_product_attention
from jaxcompress.models._common import (
    check_heads,
    check_rngs,
    embed_tokens,
    token_embeddings,
)

__all__ = ["GPT", "GPTBlock", "CausalSelfAttention", "generate"]

_KVCache = tuple[tuple[jax.Array, jax.Array], ...]
"""Per decoder block, ``(keys, values)`` each ``(batch, context, heads, head_dim)``."""

# GPT-2 initialisation (Radford et al., 2019; as nanoGPT): N(0, 0.02) for every weight matrix and
# embedding, zero biases, and N(0, 0.02 / sqrt(2 L)) for the two residual projections of each of
# the L blocks, so the residual stream's variance does not grow with depth.
_INIT_STD = 0.02


def _normal(std: float):
    return nnx.initializers.normal(std)


class CausalSelfAttention(nnx.Module):
    r"""Causal multi-head self-attention with separate ``query``, ``key``, ``value`` and ``out``
    ``nnx.Linear`` projections (each a Dense kernel ``(d_model, d_model)``, so layer-wise
    pruners see four layers).

    For ``x`` ``(B, T, d)`` and heads :math:`h` of width :math:`d_h = d / H`:

    .. math::
        A_h = \operatorname{softmax}\Bigl(\frac{Q_h K_h^\top}{\sqrt{d_h}} + C\Bigr),\qquad
        y = \operatorname{concat}_h(\mathrm{Drop}(A_h) V_h)\, W_o + b_o,

    with :math:`C_{ts} = -\infty` for :math:`s > t` (a position never sees later ones). Scores
    and softmax are float32. The head count is read from the projections' widths
    (``out_features // head_dim``), so :func:`jaxcompress.structure.prune` can remove whole
    heads; ``num_heads`` records the count the module was built with.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dropout: float,
        *,
        out_std: float,
        use_bias: bool,
        rngs: nnx.Rngs,
    ):
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads

        def linear(std: float) -> nnx.Linear:
            return nnx.Linear(
                d_model, d_model, use_bias=use_bias, kernel_init=_normal(std), rngs=rngs
            )

        self.query = linear(_INIT_STD)
        self.key = linear(_INIT_STD)
        self.value = linear(_INIT_STD)
        self.out = linear(out_std)
        self.attn_dropout = nnx.Dropout(dropout, rngs=rngs)

    def _heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        # the head count comes from the projections' widths, so that structured pruning of
        # whole heads (jaxcompress.structure) leaves a model that runs
        b, t, _ = x.shape
        q, k, v = (
            p(x).reshape(b, t, -1, self.head_dim) for p in (self.query, self.key, self.value)
        )
        return q, k, v

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        q, k, v = self._heads(x)
        y = dot_product_attention(q, k, v, causal=True, dropout=self.attn_dropout, prescale=False)
        return self.out(y.reshape(b, t, -1))

    def extend(
        self, x: jax.Array, cache: tuple[jax.Array, jax.Array], start: jax.Array | int
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """:meth:`__call__` for the ``T`` new positions ``start .. start + T - 1`` of ``x``
        ``(B, T, d)``, attending to the cached keys and values of the earlier positions.

        ``cache`` is ``(keys, values)``, each ``(B, S, H, d_h)``; the new keys and values are
        written at ``start`` (cast to the cache's dtype) and position ``start + t`` attends to
        the cached positions ``<= start + t``. Returns ``(y, cache)``.
        """
        b, t, _ = x.shape
        q, k, v = self._heads(x)
        keys, values = cache
        at = (0, start, 0, 0)
        keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), at)
        values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), at)
        query_pos = start + jnp.arange(t)[:, None]
        mask = jnp.arange(keys.shape[1])[None, :] <= query_pos  # (T, S): cached and causal
        y = dot_product_attention(q, keys, values, mask, dropout=self.attn_dropout, prescale=False)
        return self.out(y.reshape(b, t, -1)), (keys, values)


class GPTBlock(nnx.Module):
    r"""Pre-LN decoder block (Radford et al., 2019; Xiong et al., 2020, arXiv:2002.04745):

    .. math::
        h = x + \mathrm{Drop}(\mathrm{Attn}(\mathrm{LN}_1(x))),\qquad
        y = h + \mathrm{Drop}(W_2\, \operatorname{gelu}(W_1 \mathrm{LN}_2(h))).

    Attributes: ``ln1``, ``attn`` (:class:`CausalSelfAttention`), ``ln2``, ``fc1``
    (``(d_model, mlp_dim)``), ``fc2`` (``(mlp_dim, d_model)``), ``dropout``.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        mlp_dim: int,
        dropout: float,
        *,
        out_std: float,
        use_bias: bool,
        rngs: nnx.Rngs,
    ):
        self.ln1 = nnx.LayerNorm(d_model, use_bias=use_bias, rngs=rngs)
        self.attn = CausalSelfAttention(
            d_model, num_heads, dropout, out_std=out_std, use_bias=use_bias, rngs=rngs
        )
        self.ln2 = nnx.LayerNorm(d_model, use_bias=use_bias, rngs=rngs)
        self.fc1 = nnx.Linear(
            d_model, mlp_dim, use_bias=use_bias, kernel_init=_normal(_INIT_STD), rngs=rngs
        )
        self.fc2 = nnx.Linear(
            mlp_dim, d_model, use_bias=use_bias, kernel_init=_normal(out_std), rngs=rngs
        )
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.dropout(self.attn(self.ln1(x)))
        return self._mlp(x)

    def _mlp(self, x: jax.Array) -> jax.Array:
        return x + self.dropout(self.fc2(jax.nn.gelu(self.fc1(self.ln2(x)))))

    def extend(
        self, x: jax.Array, cache: tuple[jax.Array, jax.Array], start: jax.Array | int
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """:meth:`__call__` on new positions with cached keys and values (see
        :meth:`CausalSelfAttention.extend`). Returns ``(y, cache)``."""
        h, cache = self.attn.extend(self.ln1(x), cache, start)
        return self._mlp(x + self.dropout(h)), cache


class GPT(nnx.Module):
    r"""Decoder-only Transformer language model (GPT-2 layout, Radford et al., 2019), as
    nanoGPT's ``GPT``: learned token and position embeddings, pre-LN blocks with causal
    multi-head self-attention and a GELU MLP, a final LayerNorm and a linear head.

    For token ids ``t`` of shape ``(B, T)``, ``T <= context``:

    .. math::
        x^{(0)}_{b,i} = E[t_{b,i}] + P[i],\quad x^{(k+1)} = \mathrm{Block}_k(x^{(k)}),\quad
        \text{logits} = \mathrm{LN}(x^{(L)})\, W_{\text{head}},

    with :math:`W_{\text{head}} = E^\top` when ``tie_embeddings`` (weight tying, Press & Wolf,
    2017, arXiv:1608.05859), else a separate bias-free ``nnx.Linear`` ``head``. Logit
    :math:`(b, i)` depends only on ``t[b, :i+1]`` (causal), so one call scores every next-token
    prediction of a window.

    Every Dense kernel in the blocks is an ``nnx.Linear`` ``kernel`` (``(in, out)``):
    ``blocks/<k>/attn/{query,key,value,out}/kernel`` and ``blocks/<k>/{fc1,fc2}/kernel``, which
    :func:`jaxcompress.masks.prunable` selects. Embeddings are never selected; an untied
    ``head/kernel`` is (exclude it with ``where`` to keep the head dense).

    Args:
      vocab_size: number of token ids.
      context: longest sequence (rows of the position table), the block size.
      d_model: model width, divisible by ``num_heads``.
      num_heads: attention heads.
      num_layers: decoder blocks.
      mlp_dim: hidden width of the MLP; ``None`` means ``4 * d_model``.
      dropout: dropout rate on the embeddings, attention weights and residual branches; active
        only in ``model.train()`` mode; default 0.
      tie_embeddings: share the token embedding with the output head (default ``True``).
      use_bias: biases in the Linear and LayerNorm layers (default ``True``).
      rngs: ``nnx.Rngs`` with a ``params`` stream (the default stream suffices) and, for
        dropout in train mode, a ``dropout`` stream.

    Attributes: ``embed`` (``nnx.Embed`` ``(vocab_size, d_model)``), ``pos_embed``
    (``nnx.Param`` ``(context, d_model)``), ``blocks`` (:class:`GPTBlock`), ``final_ln``,
    ``head`` (``None`` when tied), ``embed_dropout``.
    Call: int tokens ``(B, T)`` -> float32 logits ``(B, T, vocab_size)``.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        context: int = 64,
        d_model: int = 128,
        num_heads: int = 4,
        num_layers: int = 4,
        mlp_dim: int | None = None,
        dropout: float = 0.0,
        tie_embeddings: bool = True,
        use_bias: bool = True,
        rngs: nnx.Rngs,
    ):
        self.vocab_size = check_int("vocab_size", vocab_size)
        self.context = check_int("context", context)
        self.d_model, self.num_heads = check_heads(d_model, num_heads)
        self.num_layers = check_int("num_layers", num_layers)
        self.mlp_dim = 4 * self.d_model if mlp_dim is None else check_int("mlp_dim", mlp_dim)
        self.dropout_rate = check_fraction("dropout", dropout, interval="[0, 1)")
        for name, value in (("tie_embeddings", tie_embeddings), ("use_bias", use_bias)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        self.tie_embeddings = tie_embeddings
        check_rngs(rngs)
        out_std = _INIT_STD / math.sqrt(2 * self.num_layers)
        self.embed, self.pos_embed, self.embed_dropout = token_embeddings(
            self.vocab_size, self.context, self.d_model, self.dropout_rate, rngs
        )
        self.blocks = nnx.List(
            [
                GPTBlock(
                    self.d_model,
                    self.num_heads,
                    self.mlp_dim,
                    self.dropout_rate,
                    out_std=out_std,
                    use_bias=use_bias,
                    rngs=rngs,
                )
                for _ in range(self.num_layers)
            ]
        )
        self.final_ln = nnx.LayerNorm(self.d_model, use_bias=use_bias, rngs=rngs)
        self.head = (
            None
            if tie_embeddings
            else nnx.Linear(
                self.d_model,
                self.vocab_size,
                use_bias=False,
                kernel_init=_normal(_INIT_STD),
                rngs=rngs,
            )
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = embed_tokens(self, tokens, "context", self.context)
        for block in self.blocks:
            x = block(x)
        return self._logits(x)

    def _logits(self, x: jax.Array) -> jax.Array:
        x = self.final_ln(x)
        if self.head is None:
            return self.embed.attend(x)
        return self.head(x)

    def init_cache(self, batch: int, dtype=jnp.float32) -> _KVCache:
        """An empty key/value cache for :meth:`extend`: per block, ``(keys, values)`` of zeros,
        each ``(batch, context, H, d_h)`` with that block's heads (structured pruning may have
        left blocks with different head counts or widths)."""
        batch = check_int("batch", batch)
        caches = []
        for block in self.blocks:
            attn = block.attn
            keys, values = (
                jnp.zeros(
                    (batch, self.context, p.out_features // attn.head_dim, attn.head_dim), dtype
                )
                for p in (attn.key, attn.value)
            )
            caches.append((keys, values))
        return tuple(caches)

    def extend(
        self, tokens: jax.Array, cache: _KVCache, start: jax.Array | int = 0
    ) -> tuple[jax.Array, _KVCache]:
        r"""Logits of ``tokens`` ``(B, T)`` placed at positions ``start .. start + T - 1``, given
        the keys and values of positions ``< start`` in ``cache`` (from :meth:`init_cache` and
        earlier calls): incremental decoding with a key/value cache.

        ``extend(t, init_cache(B), 0)`` is a prefill and equals ``model(t)`` up to float
        rounding; ``extend(t[:, i:i+1], cache, i)`` after it decodes one position, reading
        every weight once for ``B`` rows instead of recomputing the window: the memory-bound
        regime of the N:M kernel (:func:`jaxcompress.kernels.nm_linear`). ``start`` may be
        traced (one compile serves every position); the caller keeps
        ``start + T <= context`` (checked when ``start`` is a Python int).

        Returns:
          ``(logits, cache)``: float32 logits ``(B, T, vocab_size)`` and the cache with the new
          positions written.
        """
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"GPT.extend expects integer tokens of shape (batch, length), got shape "
                f"{tokens.shape} and dtype {tokens.dtype}"
            )
        b, t = tokens.shape
        if len(cache) != len(self.blocks):
            raise ValueError(
                f"cache must hold one (keys, values) pair per block ({len(self.blocks)}), got "
                f"{len(cache)}: build it with init_cache"
            )
        if isinstance(start, int) and not 0 <= start <= self.context - t:
            raise ValueError(
                f"start must lie in [0, context - T] = [0, {self.context - t}] for {t} tokens "
                f"with context={self.context}, got start={start}"
            )
        pos = jax.lax.dynamic_slice_in_dim(self.pos_embed[...], start, t, axis=0)
        x = self.embed_dropout(self.embed(tokens) + pos)
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            x, layer_cache = block.extend(x, layer_cache, start)
            new_cache.append(layer_cache)
        return self._logits(x), tuple(new_cache)


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


@functools.partial(
    jax.jit, static_argnames=("graphdef", "steps", "temperature", "use_cache", "cache_dtype")
)
def _generate(
    graphdef,
    state,
    prompt,
    key,
    *,
    steps: int,
    temperature: float,
    use_cache: bool,
    cache_dtype,
):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = prompt.shape
    context = model.context
    # Room for the prompt and the new tokens, and at least one full window.
    length = max(prompt_len + steps, context)
    buffer = jnp.zeros((batch, length), jnp.int32).at[:, :prompt_len].set(prompt)

    def pick(logits, i):  # logits (B, V) of the last position -> the token of step i
        if temperature == 0.0:
            token = jnp.argmax(logits, axis=-1)
        else:
            token = jax.random.categorical(
                jax.random.fold_in(key, i), logits.astype(jnp.float32) / temperature, axis=-1
            )
        return token.astype(jnp.int32)[:, None]

    def window_step(i, buffer):
        pos = prompt_len + i  # the position written at this step
        start = jnp.clip(pos - context, 0, length - context)
        window = jax.lax.dynamic_slice(buffer, (0, start), (batch, context))
        logits = model(window)  # (B, context, V); causal, so the zeros after pos are unseen
        last = jax.lax.dynamic_index_in_dim(logits, pos - 1 - start, axis=1, keepdims=False)
        return jax.lax.dynamic_update_slice(buffer, pick(last, i), (0, pos))

    # Steps whose window starts at position 0 (token position <= context) can reuse the keys
    # and values of earlier positions; later windows slide, which shifts every position
    # embedding, so those steps recompute the window as nanoGPT does.
    cached = min(steps, context + 1 - prompt_len) if use_cache and prompt_len <= context else 0
    if cached > 0:
        logits, cache = model.extend(prompt, model.init_cache(batch, cache_dtype), 0)
        buffer = jax.lax.dynamic_update_slice(buffer, pick(logits[:, -1], 0), (0, prompt_len))

        def cached_step(i, carry):
            buffer, cache = carry
            pos = prompt_len + i
            last_token = jax.lax.dynamic_slice(buffer, (0, pos - 1), (batch, 1))
            logits, cache = model.extend(last_token, cache, pos - 1)
            return jax.lax.dynamic_update_slice(buffer, pick(logits[:, 0], i), (0, pos)), cache

        buffer, _ = jax.lax.fori_loop(1, cached, cached_step, (buffer, cache))
    buffer = jax.lax.fori_loop(cached, steps, window_step, buffer)
    return buffer[:, : prompt_len + steps]


def generate(
    model: GPT,
    prompt_ids: jax.Array,
    steps: int,
    key: jax.Array,
    temperature: float = 1.0,
    *,
    use_cache: bool = True,
    cache_dtype=jnp.float32,
) -> jax.Array:
    r"""Sample ``steps`` tokens after ``prompt_ids`` autoregressively (as nanoGPT's
    ``GPT.generate``).

    Each new token is drawn from :math:`\operatorname{softmax}(z / \tau)` where :math:`z` are
    the logits of the last position given at most the last ``model.context`` tokens (the
    window is cropped as in nanoGPT, positions restarting at 0). ``temperature=0`` takes the
    argmax. Step ``i`` uses the key ``jax.random.fold_in(key, i)``, so the result is a pure
    function of ``key``.

    With ``use_cache`` (the default) the prompt is run once (:meth:`GPT.extend`) and each new
    token while the sequence fits the context costs one position: a ``(B, d)`` row per weight
    and attention over the cached keys and values (:meth:`GPT.init_cache`, ``cache_dtype``).
    Past the context the window slides, every position embedding shifts, and those steps
    recompute the window as nanoGPT does. ``use_cache=False`` recomputes the window at every
    step; both give the same tokens up to float rounding of the logits.

    The whole loop is jitted (``lax.fori_loop`` over a fixed-size token buffer); it compiles
    once per ``(model structure, prompt shape, steps, temperature, use_cache)`` and runs the
    model in eval mode (dropout off) without modifying ``model``.

    Args:
      model: a :class:`GPT`.
      prompt_ids: integer token ids ``(B, P)`` with ``P >= 1``, each in ``[0, vocab_size)``.
      steps: number of tokens to generate (``>= 1``).
      key: a PRNG key (``jax.random.key`` or a raw ``uint32[2]`` key).
      temperature: sampling temperature ``>= 0``.
      use_cache: decode with a key/value cache (see above).
      cache_dtype: dtype of the cached keys and values.

    Returns:
      ``int32`` ids ``(B, P + steps)``: the prompt followed by the generated tokens.
    """
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a jaxcompress.models.GPT, got {type(model).__name__}")
    prompt = jnp.asarray(prompt_ids)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(
            f"prompt_ids must be integer token ids of shape (B, P) with P >= 1, got shape "
            f"{prompt.shape} and dtype {prompt.dtype}"
        )
    lo, hi = int(jnp.min(prompt)), int(jnp.max(prompt))
    if lo < 0 or hi >= model.vocab_size:
        raise ValueError(
            f"prompt_ids must lie in [0, vocab_size={model.vocab_size}), got values in [{lo}, {hi}]"
        )
    steps = check_int("steps", steps)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a float >= 0, got {temperature!r}")
    if not (math.isfinite(float(temperature)) and float(temperature) >= 0.0):
        raise ValueError(f"temperature must be a finite float >= 0, got {temperature!r}")
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache must be a bool, got {use_cache!r}")
    cache_dtype = jnp.dtype(cache_dtype)
    if not jnp.issubdtype(cache_dtype, jnp.floating):
        raise ValueError(f"cache_dtype must be a float dtype, got {cache_dtype}")
    graphdef, state = nnx.split(nnx.view(model, deterministic=True, raise_if_not_found=False))
    return _generate(
        graphdef,
        state,
        prompt.astype(jnp.int32),
        key,
        steps=steps,
        temperature=float(temperature),
        use_cache=use_cache,
        cache_dtype=cache_dtype,
    )
