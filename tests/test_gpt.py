"""Tests for jaxcompress.models.GPT and generate: shapes, causality, tying, counts, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import count_compiles
from flax import nnx

import jaxcompress as jc
from jaxcompress.models import GPT, generate

V, C = 11, 8


def small(**kw) -> GPT:
    args = dict(context=C, d_model=16, num_heads=2, num_layers=2, rngs=nnx.Rngs(0))
    args.update(kw)
    return GPT(V, **args)


def tokens(b, t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, t)), jnp.int32)


def num_params(model) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_logits_shape_dtype_and_shorter_sequences():
    model = small()
    assert model(tokens(3, C)).shape == (3, C, V)
    assert model(tokens(3, C)).dtype == jnp.float32
    assert model(tokens(2, 5)).shape == (2, 5, V)


def test_causal_changing_token_t_leaves_earlier_logits_unchanged():
    model = small()
    x = tokens(2, C, seed=1)
    base = model(x)
    for t in (0, 3, C - 1):
        x2 = x.at[:, t].set((x[:, t] + 1) % V)
        out = model(x2)
        np.testing.assert_allclose(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        # ... and the change is visible at t itself (the model is not trivially constant).
        assert float(jnp.max(jnp.abs(out[:, t] - base[:, t]))) > 1e-6


def test_prefix_logits_equal_logits_of_the_prefix_alone():
    model = small()
    x = tokens(2, C, seed=2)
    np.testing.assert_allclose(model(x)[:, :5], model(x[:, :5]), rtol=1e-5, atol=1e-6)


def test_attention_matches_a_numpy_oracle():
    model = small(num_layers=1)
    attn = model.blocks[0].attn
    x = np.random.default_rng(3).normal(size=(2, 6, 16)).astype(np.float32)

    def lin(layer, v):
        return v @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])

    q, k, v = (lin(layer, x).reshape(2, 6, 2, 8) for layer in (attn.query, attn.key, attn.value))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    s = np.where(np.tril(np.ones((6, 6), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    y = np.einsum("bhqk,bkhd->bqhd", a, v).reshape(2, 6, 16)
    np.testing.assert_allclose(attn(jnp.asarray(x)), lin(attn.out, y), rtol=1e-4, atol=1e-5)


def test_tied_head_is_the_embedding_transpose():
    model = small()
    assert model.head is None
    x = tokens(2, C)
    h = model.blocks[1](model.blocks[0](model.embed(x) + model.pos_embed[...][:C]))
    expected = model.final_ln(h) @ model.embed.embedding[...].T
    np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)
    # Changing the embedding changes the head: they are one array.
    model.embed.embedding[...] = model.embed.embedding[...].at[3].add(1.0)
    assert not np.allclose(model(x), expected)


def test_untied_head_is_a_separate_prunable_kernel():
    model = small(tie_embeddings=False)
    assert model.head.kernel.shape == (16, V)
    assert model.head.bias is None
    paths = [
        jc.masks.path_str(p)
        for p, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
        if jc.masks.prunable(p, leaf)
    ]
    assert "head/kernel" in paths


def test_param_count_equals_a_hand_count():
    d, layers, f = 16, 2, 64  # width, blocks, MLP width (4 d); heads do not change the count
    block = 2 * d + 4 * (d * d + d) + 2 * d + (d * f + f) + (f * d + d)
    tied = V * d + C * d + layers * block + 2 * d
    assert num_params(small()) == tied
    assert num_params(small(tie_embeddings=False)) == tied + d * V
    no_bias = V * d + C * d + layers * (d + 4 * d * d + d + 2 * d * f) + d
    assert num_params(small(use_bias=False)) == no_bias
    # nanoGPT's CPU setting with the 65-character vocabulary (tied): 0.81M parameters.
    big = GPT(65, context=64, d_model=128, num_heads=4, num_layers=4, rngs=nnx.Rngs(0))
    assert num_params(big) == 809_856


def test_prunable_selects_exactly_the_block_linears():
    model = small()
    paths = sorted(
        jc.masks.path_str(p)
        for p, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
        if jc.masks.prunable(p, leaf)
    )
    expected = sorted(
        f"blocks/{k}/{name}/kernel"
        for k in range(2)
        for name in ("attn/query", "attn/key", "attn/value", "attn/out", "fc1", "fc2")
    )
    assert paths == expected


def test_dropout_only_in_train_mode():
    model = small(dropout=0.5, rngs=nnx.Rngs(0, dropout=1))
    x = tokens(2, C)
    model.eval()
    np.testing.assert_array_equal(model(x), model(x))
    model.train()
    assert not np.allclose(model(x), model(x))


def test_generate_is_deterministic_per_key_and_compiles_once():
    model = small()
    prompt = tokens(2, 3)
    a = generate(model, prompt, 12, jax.random.key(0))
    b = generate(model, prompt, 12, jax.random.key(0))
    c = generate(model, prompt, 12, jax.random.key(1))
    assert a.shape == (2, 15) and a.dtype == jnp.int32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, :3], prompt)
    assert not np.array_equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < V
    with count_compiles() as counter:
        generate(model, prompt, 12, jax.random.key(5))
    assert counter.compiles == 0


def test_generate_greedy_matches_a_python_loop_past_the_context():
    model = small()
    prompt = tokens(1, 2, seed=4)
    out = generate(model, prompt, C + 4, jax.random.key(0), temperature=0.0)
    seq = [int(t) for t in prompt[0]]
    for _ in range(C + 4):
        window = jnp.asarray([seq[-C:]], jnp.int32)
        seq.append(int(jnp.argmax(model(window)[0, -1])))
    assert [int(t) for t in out[0]] == seq


def _decode_incrementally(model, toks, prefill):
    cache = model.init_cache(toks.shape[0])
    logits, cache = model.extend(toks[:, :prefill], cache, 0)
    out = [logits]
    step = jax.jit(lambda t, c, i: model.extend(t, c, i))
    columns = [toks[:, i : i + 1] for i in range(prefill, toks.shape[1])]
    logits, cache = step(columns[0], cache, jnp.int32(prefill))
    out.append(logits)
    with count_compiles() as counter:  # the traced start serves every later position
        for i, column in enumerate(columns[1:], prefill + 1):
            logits, cache = step(column, cache, jnp.int32(i))
            out.append(logits)
    return jnp.concatenate(out, axis=1), cache, counter


@pytest.mark.parametrize("tie", [True, False])
def test_kv_cache_prefill_and_decode_equal_the_full_forward(tie):
    model = small(tie_embeddings=tie)
    toks = tokens(3, C, seed=2)
    logits, cache, counter = _decode_incrementally(model, toks, prefill=3)
    np.testing.assert_allclose(logits, model(toks), atol=2e-6, rtol=1e-5)
    assert counter.compiles == 0
    # the cache holds exactly the keys of the full sequence, per block
    attn = model.blocks[0].attn
    keys = attn.key(model.blocks[0].ln1(model.embed(toks) + model.pos_embed[...]))
    np.testing.assert_allclose(
        cache[0][0], keys.reshape(3, C, attn.num_heads, attn.head_dim), atol=2e-6
    )
    assert len(cache) == model.num_layers


@pytest.mark.parametrize(
    "prompt_len, steps, temperature",
    [(2, C + 4, 0.0), (2, C + 4, 1.5), (C, 3, 0.0), (C + 2, 3, 1.5)],
)
def test_cached_generate_equals_window_recompute(prompt_len, steps, temperature):
    # (C, 3): only the prefill step is cached; (C + 2, 3): no step is; (2, C + 4) crosses the
    # context, where the window starts to slide and generation recomputes it.
    model = small()
    prompt = tokens(2, prompt_len, seed=prompt_len)
    key = jax.random.key(3)
    cached = generate(model, prompt, steps, key, temperature)
    window = generate(model, prompt, steps, key, temperature, use_cache=False)
    np.testing.assert_array_equal(cached, window)


def test_cached_generate_of_a_bfloat16_model_with_a_bfloat16_cache():
    model = small(num_layers=1)
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.bfloat16), state))
    prompt = tokens(2, 2, seed=9)
    out = generate(model, prompt, 4, jax.random.key(0), 0.0, cache_dtype=jnp.bfloat16)
    assert out.shape == (2, 6)
    np.testing.assert_array_equal(out[:, :2], prompt)
    logits, cache = model.extend(prompt, model.init_cache(2, jnp.bfloat16), 0)
    assert cache[0][0].dtype == jnp.bfloat16
    np.testing.assert_allclose(
        logits.astype(jnp.float32), model(prompt).astype(jnp.float32), atol=1e-2
    )


def test_whole_heads_prune_structurally_and_the_pruned_model_decodes_with_the_cache():
    model = small(d_model=24, num_heads=3)
    x = jnp.zeros((1, C), jnp.int32)
    groups = jc.structure.groups(model, x)
    heads = [name for name, g in groups.items() if g.prunable and g.size == 3]
    assert heads == ["blocks/0/attn/query:1.0", "blocks/1/attn/query:1.0"]
    keep = {heads[0]: np.array([True, False, True]), heads[1]: np.array([False, True, False])}
    pruned = jc.structure.prune(model, keep, x)
    zeroed = jc.structure.zero(model, keep, x)
    toks = tokens(2, C, seed=5)
    np.testing.assert_allclose(pruned(toks), zeroed(toks), atol=1e-5)
    attn = [block.attn for block in pruned.blocks]
    assert [a.query.kernel.shape for a in attn] == [(24, 16), (24, 8)]
    assert [a.out.kernel.shape for a in attn] == [(16, 24), (8, 24)]
    assert [c[0].shape for c in pruned.init_cache(2)] == [(2, C, 2, 8), (2, C, 1, 8)]
    key = jax.random.key(0)
    cached = generate(pruned, toks[:, :2], C + 2, key, 0.0)
    np.testing.assert_array_equal(
        cached, generate(pruned, toks[:, :2], C + 2, key, 0.0, use_cache=False)
    )
    np.testing.assert_array_equal(cached, generate(zeroed, toks[:, :2], C + 2, key, 0.0))


def test_structured_one_shot_pruning_halves_heads_and_mlp_units():
    model = small(d_model=32, num_heads=4)
    x = jnp.zeros((1, C), jnp.int32)
    pruned, keep = jc.prune.structured(model, 0.5, x)
    assert {name: int(mask.sum()) for name, mask in keep.items()} == {
        "blocks/0/attn/query:1.0": 2,
        "blocks/0/fc1": 64,
        "blocks/1/attn/query:1.0": 2,
        "blocks/1/fc1": 64,
    }
    for block in pruned.blocks:
        assert block.attn.query.kernel.shape == block.attn.value.kernel.shape == (32, 16)
        assert block.fc1.kernel.shape == (32, 64)
    prompt = tokens(2, 3, seed=6)
    key = jax.random.key(1)
    np.testing.assert_array_equal(
        generate(pruned, prompt, 6, key, 0.0),
        generate(pruned, prompt, 6, key, 0.0, use_cache=False),
    )


def test_generate_samples_from_the_softmax():
    # Every row has the same one-token prompt, so every draw is from softmax(logits / T).
    model = small(num_layers=1)
    prompt = jnp.zeros((4000, 1), jnp.int32)
    out = np.asarray(generate(model, prompt, 1, jax.random.key(0), temperature=2.0))[:, 1]
    probs = np.asarray(jax.nn.softmax(model(prompt[:1])[0, 0] / 2.0))
    freq = np.bincount(out, minlength=V) / out.size
    assert np.abs(freq - probs).max() < 0.03


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        small(num_heads=3)
    with pytest.raises(ValueError, match="context"):
        small(context=0)
    with pytest.raises(TypeError, match="vocab_size"):
        GPT(2.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dropout"):
        small(dropout=1.0)
    with pytest.raises(TypeError, match="tie_embeddings"):
        small(tie_embeddings=1)
    with pytest.raises(TypeError, match="rngs"):
        GPT(V, rngs=0)
    model = small()
    with pytest.raises(ValueError, match="context=8"):
        model(tokens(1, C + 1))
    with pytest.raises(ValueError, match=r"integer tokens of shape \(batch, length\)"):
        model(jnp.zeros((2, 3), jnp.float32))
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, jnp.zeros((3,), jnp.int32), 2, jax.random.key(0))
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, jnp.full((1, 2), V, jnp.int32), 2, jax.random.key(0))
    with pytest.raises(ValueError, match="steps"):
        generate(model, tokens(1, 2), 0, jax.random.key(0))
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tokens(1, 2), 2, jax.random.key(0), temperature=-1.0)
    with pytest.raises(TypeError, match="use_cache"):
        generate(model, tokens(1, 2), 2, jax.random.key(0), use_cache=1)
    with pytest.raises(ValueError, match="cache_dtype"):
        generate(model, tokens(1, 2), 2, jax.random.key(0), cache_dtype=jnp.int32)
    cache = model.init_cache(1)
    with pytest.raises(ValueError, match=r"start must lie in \[0, context - T\] = \[0, 6\]"):
        model.extend(tokens(1, 2), cache, 7)
    with pytest.raises(ValueError, match="one \\(keys, values\\) pair per block \\(2\\)"):
        model.extend(tokens(1, 2), cache[:1], 0)
    with pytest.raises(ValueError, match="GPT.extend expects integer tokens"):
        model.extend(jnp.zeros((1, 2)), cache, 0)
    with pytest.raises(ValueError, match="batch"):
        model.init_cache(0)
