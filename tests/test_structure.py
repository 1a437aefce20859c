"""jaxcompress.structure: dependency groups traced from any NNX model, prune == zero."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxcompress as jc
from jaxcompress import structure as S

# --------------------------------------------------------------------------------------------
# Models defined only here
# --------------------------------------------------------------------------------------------


class _ConvNeXtBlock(nnx.Module):
    """ConvNeXt block (Liu et al., 2022): dw 7x7 conv, LayerNorm, pointwise MLP, layer scale."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.dwconv = nnx.Conv(dim, dim, (7, 7), feature_group_count=dim, rngs=rngs)
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.pwconv1 = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.pwconv2 = nnx.Linear(4 * dim, dim, rngs=rngs)
        self.gamma = nnx.Param(jnp.full((dim,), 0.5))

    def __call__(self, x):
        h = self.pwconv2(jax.nn.gelu(self.pwconv1(self.norm(self.dwconv(x)))))
        return x + self.gamma[...] * h


class _ConvNeXt(nnx.Module):
    def __init__(self, dim: int = 8, classes: int = 5, *, rngs: nnx.Rngs):
        self.stem = nnx.Conv(3, dim, (2, 2), strides=(2, 2), rngs=rngs)
        self.stem_norm = nnx.LayerNorm(dim, rngs=rngs)
        self.blocks = nnx.List([_ConvNeXtBlock(dim, rngs=rngs) for _ in range(2)])
        self.head_norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, classes, rngs=rngs)

    def __call__(self, x):
        x = self.stem_norm(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.head(self.head_norm(x.mean(axis=(1, 2))))


class _Attention(nnx.Module):
    """Fused-qkv self-attention; the head count follows ``qkv.out_features`` (prunable)."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.head_dim = dim // heads
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x):
        n, length, _ = x.shape
        heads = self.qkv.out_features // (3 * self.head_dim)
        qkv = self.qkv(x).reshape(n, length, 3, heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = jax.nn.softmax(q @ k.swapaxes(-1, -2) * self.head_dim**-0.5, axis=-1)
        out = (att @ v).transpose(0, 2, 1, 3).reshape(n, length, heads * self.head_dim)
        return self.proj(out)


class _ViT(nnx.Module):
    """ViT (Dosovitskiy et al., 2021): patch-embedding conv, class token, pre-LN blocks."""

    def __init__(self, dim=16, heads=4, depth=2, mlp=32, patch=4, image=16, classes=5, *, rngs):
        self.patch = nnx.Conv(
            3, dim, (patch, patch), strides=(patch, patch), padding="VALID", rngs=rngs
        )
        tokens = 1 + (image // patch) ** 2
        self.cls = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, dim)))
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, tokens, dim)))
        self.ln1 = nnx.List([nnx.LayerNorm(dim, rngs=rngs) for _ in range(depth)])
        self.attn = nnx.List([_Attention(dim, heads, rngs=rngs) for _ in range(depth)])
        self.ln2 = nnx.List([nnx.LayerNorm(dim, rngs=rngs) for _ in range(depth)])
        self.fc1 = nnx.List([nnx.Linear(dim, mlp, rngs=rngs) for _ in range(depth)])
        self.fc2 = nnx.List([nnx.Linear(mlp, dim, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, classes, rngs=rngs)

    def __call__(self, x):
        h = self.patch(x)
        n, d = h.shape[0], h.shape[-1]
        h = h.reshape(n, -1, d)
        h = jnp.concatenate([jnp.broadcast_to(self.cls[...], (n, 1, d)), h], axis=1)
        h = h + self.pos[...]
        for ln1, attn, ln2, fc1, fc2 in zip(
            self.ln1, self.attn, self.ln2, self.fc1, self.fc2, strict=True
        ):
            h = h + attn(ln1(h))
            h = h + fc2(jax.nn.gelu(fc1(ln2(h))))
        return self.head(self.norm(h[:, 0]))


@jax.custom_vjp
def _clip_grad(x):
    return x


_clip_grad.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -1.0, 1.0),))


class _MixNet(nnx.Module):
    """Inverted bottleneck with a depthwise conv, a grouped conv, concatenated branches, a
    fused Dense split into a gated linear unit, and a custom_vjp op."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.expand = nnx.Conv(3, 12, (1, 1), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(12, rngs=rngs)
        self.dw = nnx.Conv(12, 12, (3, 3), feature_group_count=12, use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(12, rngs=rngs)
        self.grouped = nnx.Conv(12, 8, (3, 3), feature_group_count=2, rngs=rngs)
        self.branch_a = nnx.Conv(8, 6, (3, 3), rngs=rngs)
        self.branch_b = nnx.Conv(8, 4, (1, 1), rngs=rngs)
        self.fused = nnx.Linear(10, 32, rngs=rngs)
        self.out = nnx.Linear(16, 5, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.bn1(self.expand(x)))
        h = jax.nn.relu(self.bn2(self.dw(h)))
        h = _clip_grad(jax.nn.relu(self.grouped(h)))
        h = jnp.concatenate([jax.nn.relu(self.branch_a(h)), jax.nn.relu(self.branch_b(h))], -1)
        a, b = jnp.split(self.fused(h.mean(axis=(1, 2))), 2, axis=-1)
        return self.out(a * jax.nn.sigmoid(b))


class _SEGroupNormTied(nnx.Module):
    """GroupNorm, a squeeze-and-excitation gate and an output head tied to an embedding."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.c1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.gn = nnx.GroupNorm(8, num_groups=4, rngs=rngs)
        self.se1 = nnx.Linear(8, 4, rngs=rngs)
        self.se2 = nnx.Linear(4, 8, rngs=rngs)
        self.c2 = nnx.Conv(8, 6, (3, 3), rngs=rngs)
        self.emb = nnx.Embed(20, 6, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.gn(self.c1(x)))
        s = jax.nn.sigmoid(self.se2(jax.nn.relu(self.se1(h.mean(axis=(1, 2))))))
        h = self.c2(h * s[:, None, None, :]).mean(axis=(1, 2))
        return self.emb.attend(h)


class _SortNet(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(6, 8, rngs=rngs)
        self.fc2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jnp.sort(jax.nn.relu(self.fc1(x)), axis=-1))


# --------------------------------------------------------------------------------------------
# Hand counts of parameters (nnx.Param only) from the kept unit counts
# --------------------------------------------------------------------------------------------


def _n_params(model) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))


def _mlp_params(k):
    h0, h1 = k["layers/0"], k["layers/1"]
    return 784 * h0 + h0 + h0 * h1 + h1 + h1 * 10 + 10


def _cnn_params(k):
    c0, c1, c2 = k["blocks/0/conv"], k["blocks/1/conv"], k["blocks/2/conv"]
    return 9 * 1 * c0 + 2 * c0 + 9 * c0 * c1 + 2 * c1 + 9 * c1 * c2 + 2 * c2 + c2 * 10 + 10


def _resnet8_params(k):
    s0, s1, s2 = k["stem_conv"], k["stages/1/0/conv2"], k["stages/2/0/conv2"]
    m0, m1, m2 = k["stages/0/0/conv1"], k["stages/1/0/conv1"], k["stages/2/0/conv1"]
    total = 9 * 3 * s0 + 2 * s0  # stem
    total += 9 * s0 * m0 + 2 * m0 + 9 * m0 * s0 + 2 * s0  # stage 0, identity shortcut
    for a, m, b in ((s0, m1, s1), (s1, m2, s2)):  # projecting blocks
        total += 9 * a * m + 2 * m + 9 * m * b + 2 * b + a * b + 2 * b
    return total + s2 * 10 + 10


def _transformer_params(k, *, vocab=50, d=16, heads=4, hd=4, mlp=32, max_len=8, layers=2):
    total = vocab * d + max_len * d + 2 * d + d * 2 + 2
    for i in range(layers):
        h, f = k[f"blocks/{i}/attn/query:1"], k[f"blocks/{i}/mlp_in"]
        vd = k[f"blocks/{i}/attn/value"]
        total += 2 * (d * h * hd + h * hd)  # query, key
        total += d * h * vd + h * vd + h * vd * d + d  # value, out
        total += 4 * d + d * f + f + f * d + d
    return total


def _convnext_params(k, *, dim=8, classes=5):
    total = 4 * 3 * dim + dim + 2 * dim + 2 * dim + dim * classes + classes
    for i in range(2):
        f = k[f"blocks/{i}/pwconv1"]
        total += 49 * dim + dim + 2 * dim + dim * f + f + f * dim + dim + dim
    return total


def _vit_params(k, *, dim=16, hd=4, mlp=32, classes=5, tokens=17):
    total = 16 * 3 * dim + dim + dim + tokens * dim + 2 * dim + dim * classes + classes
    for i in range(2):
        h, f = k[f"attn/{i}/qkv:1.0"], k[f"fc1/{i}"]
        total += 2 * dim + dim * 3 * h * hd + 3 * h * hd + h * hd * dim + dim
        total += 2 * dim + dim * f + f + f * dim + dim
    return total


def _mixnet_params(k):
    g, per, co = k["expand:3.0"], k["expand:3.1"], k["grouped"]
    a, b, f = k["branch_a"], k["branch_b"], k["fused"]
    e = g * per
    total = 3 * e + 2 * e + 9 * e + 2 * e  # expand, bn1, depthwise, bn2
    total += 9 * per * g * co + g * co  # grouped conv: kernel (3, 3, e / g, g * co)
    total += 9 * g * co * a + a + g * co * b + b
    return total + (a + b) * 2 * f + 2 * f + f * 5 + 5


def _se_params(k):
    e, s, c = 2 * k["c1:3.0"], k["se1"], k["c2"]
    return 27 * e + e + 2 * e + e * s + s + s * e + e + 9 * e * c + c + 20 * c


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------

_KEY = jax.random.key(1)


def _eqn_macs(eqn) -> int:
    """Multiply-adds of one equation, from its shapes alone (independent of the tracer)."""
    name = eqn.primitive.name
    if name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lc)
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
        per_out = rhs[spec[1]] * math.prod(rhs[i] for i in spec[2:])
        return math.prod(eqn.outvars[0].aval.shape) * per_out
    return 0


def _walk_macs(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += _eqn_macs(eqn)
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    total += _walk_macs(inner)
    return total


def jaxpr_macs(model, *inputs) -> int:
    """Oracle: the multiply-adds of ``model(*inputs)`` (inference mode), counted from the
    shapes of every ``dot_general`` and convolution of its jaxpr."""
    view = nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)
    graphdef, state = nnx.split(view)
    jaxpr = jax.make_jaxpr(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *inputs)
    return _walk_macs(jaxpr.jaxpr)


def _mlp():
    return jc.models.MLP(rngs=nnx.Rngs(0)), jax.random.normal(_KEY, (3, 28, 28, 1))


def _cnn():
    return jc.models.SmallCNN(rngs=nnx.Rngs(0)), jax.random.normal(_KEY, (3, 28, 28, 1))


def _resnet8():
    return jc.models.resnet8(rngs=nnx.Rngs(0)), jax.random.normal(_KEY, (3, 16, 16, 3))


def _transformer():
    model = jc.models.TransformerClassifier(
        50, d_model=16, num_heads=4, mlp_dim=32, max_len=8, num_layers=2, rngs=nnx.Rngs(0)
    )
    tokens = jax.random.randint(_KEY, (3, 8), 0, 50).at[0, 5:].set(0)
    return model, tokens


def _convnext():
    return _ConvNeXt(rngs=nnx.Rngs(0)), jax.random.normal(_KEY, (3, 16, 16, 3))


def _vit():
    return _ViT(rngs=nnx.Rngs(0)), jax.random.normal(_KEY, (3, 16, 16, 3))


def _mixnet():
    return _MixNet(rngs=nnx.Rngs(0)), jax.random.normal(_KEY, (3, 8, 8, 3))


def _se():
    return _SEGroupNormTied(rngs=nnx.Rngs(0)), jax.random.normal(_KEY, (3, 8, 8, 3))


CASES = {
    "mlp": (_mlp, _mlp_params),
    "cnn": (_cnn, _cnn_params),
    "resnet8": (_resnet8, _resnet8_params),
    "transformer": (_transformer, _transformer_params),
    "convnext": (_convnext, _convnext_params),
    "vit": (_vit, _vit_params),
    "mixnet": (_mixnet, _mixnet_params),
    "se_groupnorm_tied": (_se, _se_params),
}

PRUNABLE = {
    "mlp": {"layers/0": 300, "layers/1": 100},
    "cnn": {"blocks/0/conv": 32, "blocks/1/conv": 64, "blocks/2/conv": 128},
    "resnet8": {
        "stem_conv": 16,
        "stages/0/0/conv1": 16,
        "stages/1/0/conv1": 32,
        "stages/1/0/conv2": 32,
        "stages/2/0/conv1": 64,
        "stages/2/0/conv2": 64,
    },
    "transformer": {
        f"blocks/{i}/{n}": s
        for i in range(2)
        for n, s in (("attn/query:1", 4), ("attn/value", 4), ("mlp_in", 32))
    },
    "convnext": {"blocks/0/pwconv1": 32, "blocks/1/pwconv1": 32},
    "vit": {
        f"{n}/{i}{s}": u for i in range(2) for n, s, u in (("attn", "/qkv:1.0", 4), ("fc1", "", 32))
    },
    "mixnet": {
        "expand:3.0": 2,
        "expand:3.1": 6,
        "grouped": 4,
        "branch_a": 6,
        "branch_b": 4,
        "fused": 16,
    },
    # whole GroupNorm groups (of 2 channels) are units; the tied embedding reads c2's output
    "se_groupnorm_tied": {"c1:3.0": 4, "se1": 4, "c2": 6},
}


@functools.cache
def _case(name):
    """Each case's model and input, built once (model initialisation dominates test time)."""
    model, x = CASES[name][0]()
    model.eval()
    return model, x


@nnx.jit
def _forward(model, x):
    return model(x)


def _random_keep(groups, rng):
    keep = {}
    for name, g in groups.items():
        if g.prunable:
            mask = rng.random(g.size) < rng.uniform(0.3, 0.9)
            mask[rng.integers(g.size)] = True
            keep[name] = mask
    return keep


def _eval(model):
    model.eval()
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_prunable_groups(case):
    model, x = _case(case)
    groups = S.groups(model, x)
    assert {n: g.size for n, g in groups.items() if g.prunable} == PRUNABLE[case]
    for g in groups.values():
        assert g.prunable == (not g.reasons)
        for m in g.members:
            assert m.units.max() < g.size and np.bincount(m.units[m.units >= 0]).min() >= 1


@pytest.mark.parametrize("case", list(CASES))
def test_prune_equals_zero_and_hand_counts(case):
    hand_count = CASES[case][1]
    model, x = _case(case)
    groups = S.groups(model, x)
    full = {n: g.size for n, g in groups.items() if g.prunable}
    assert _n_params(model) == hand_count(full)
    y = _forward(model, x)
    for seed in range(2):
        keep = _random_keep(groups, np.random.default_rng(seed))
        pruned = _eval(S.prune(model, keep, x))
        zeroed = _eval(S.zero(model, keep, x))
        out, ref = _forward(pruned, x), _forward(zeroed, x)
        assert out.shape == y.shape
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
        assert float(jnp.max(jnp.abs(ref - y))) > 1e-4  # the keep pattern changed the function
        assert _n_params(pruned) == hand_count({n: int(m.sum()) for n, m in keep.items()})
        assert _n_params(zeroed) == _n_params(model)
    np.testing.assert_array_equal(np.asarray(_forward(model, x)), np.asarray(y))  # untouched


def test_groups_structure_resnet_stage_and_heads():
    model, x = _case("resnet8")
    g = S.groups(model, x)["stages/1/0/conv2"]
    members = {(m.name, m.axis) for m in g.members}
    # the stage's residual stream: conv2 and the projection shortcut write it, stage 2 reads it
    assert {
        ("stages/1/0/conv2/kernel", 3),
        ("stages/1/0/shortcut_conv/kernel", 3),
        ("stages/1/0/shortcut_bn/mean", 0),
        ("stages/2/0/conv1/kernel", 2),
        ("stages/2/0/shortcut_conv/kernel", 2),
    } <= members
    model, tokens = _case("transformer")
    groups = S.groups(model, tokens)
    heads = groups["blocks/0/attn/query:1"]
    assert {(m.name, m.axis) for m in heads.members} >= {
        ("blocks/0/attn/query/kernel", 1),
        ("blocks/0/attn/key/kernel", 1),
        ("blocks/0/attn/value/kernel", 1),
        ("blocks/0/attn/out/kernel", 0),
    }
    stream = groups["embed"]
    assert not stream.prunable and any("reduce_sum" in r for r in stream.reasons)
    assert not groups["blocks/0/attn/query:2"].prunable  # q . k over the head dimension
    assert not groups["head"].prunable


def test_fused_qkv_heads_index_map():
    model, x = _case("vit")
    heads = S.groups(model, x)["attn/0/qkv:1.0"]
    kernel = next(m for m in heads.members if m.name == "attn/0/qkv/kernel")
    # axis of 3 * dim = (qkv, heads, head_dim): unit h owns h*4 .. h*4+3 in each of q, k, v
    np.testing.assert_array_equal(kernel.units, np.tile(np.repeat(np.arange(4), 4), 3))
    proj = next(m for m in heads.members if m.name == "attn/0/proj/kernel")
    np.testing.assert_array_equal(proj.units, np.repeat(np.arange(4), 4))


def test_prune_updates_flax_attributes():
    model, x = _case("mixnet")
    keep = {
        "expand:3.0": np.array([True, False]),
        "expand:3.1": np.array([1, 1, 0, 1, 0, 1], bool),
        "grouped": np.array([1, 0, 1, 1], bool),
        "fused": np.arange(16) % 3 == 0,
    }
    small = S.prune(model, keep, x)
    assert (small.dw.feature_group_count, small.dw.in_features, small.dw.out_features) == (4, 4, 4)
    assert small.grouped.feature_group_count == 1
    assert (small.grouped.in_features, small.grouped.out_features) == (4, 3)
    assert small.bn1.num_features == 4 and small.fused.out_features == 12
    assert small.out.in_features == 6
    model, x = _case("se_groupnorm_tied")
    small = S.prune(model, {"c1:3.0": np.array([True, False, False, True])}, x)
    assert (small.gn.num_groups, small.gn.num_features, small.c2.in_features) == (2, 4, 4)
    model, tokens = _case("transformer")
    keep = {"blocks/1/attn/query:1": np.array([True, False, False, True])}
    attn = S.prune(model, keep, tokens).blocks[1].attn
    assert (attn.num_heads, attn.head_dim, attn.qkv_features) == (2, 4, 8)
    assert attn.query.out_features == (2, 4)


@pytest.mark.parametrize("case", ["cnn", "resnet8", "vit", "mixnet"])
def test_macs_match_count_macs(case):
    model, x = _case(case)
    x1 = x[:1]
    macs = S.macs(model, x1)
    assert macs.dense == jaxpr_macs(model, x1)
    groups = S.groups(model, x1)
    for seed in range(2):
        keep = _random_keep(groups, np.random.default_rng(seed))
        pruned = S.prune(model, keep, x1)
        kept = {n: int(m.sum()) for n, m in keep.items()}
        assert macs(kept) == jaxpr_macs(pruned, x1)
    # differentiable in relaxed counts
    grad = jax.grad(lambda c: macs({n: c[n] for n in c}))(
        {n: 1.0 * s for n, s in macs.sizes.items()}
    )
    assert all(float(v) > 0 for v in grad.values())


def test_mlp_macs_by_hand():
    model, x = _case("mlp")
    macs = S.macs(model, x[:1])
    assert macs({"layers/0": 7, "layers/1": 5}) == 784 * 7 + 7 * 5 + 5 * 10
    assert macs.terms == {("layers/0",): 784, ("layers/0", "layers/1"): 1, ("layers/1",): 10}


def test_pruned_model_round_trips_through_checkpointer(tmp_path):
    model, x = _case("resnet8")
    keep = _random_keep(S.groups(model, x), np.random.default_rng(3))
    pruned = S.prune(model, keep, x)
    with jc.checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(0, model_state=nnx.state(pruned))
        skeleton = S.prune(jc.models.resnet8(rngs=nnx.Rngs(5)), keep, x)
        target = {"model_state": jax.eval_shape(lambda: nnx.state(skeleton))}
        restored = ckpt.restore(target=target)
    nnx.update(skeleton, restored["model_state"])
    skeleton.eval()
    np.testing.assert_array_equal(
        np.asarray(_forward(skeleton, x)), np.asarray(_forward(pruned, x))
    )


def test_unsupported_primitive_is_reported_and_refused():
    class FFTNet(nnx.Module):
        def __init__(self, rngs):
            self.fc1, self.fc2 = nnx.Linear(6, 8, rngs=rngs), nnx.Linear(5, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc2(jnp.abs(jnp.fft.rfft(jax.nn.relu(self.fc1(x)), axis=-1)))

    model, x = FFTNet(nnx.Rngs(0)), jnp.ones((2, 6))
    g = S.groups(model, x)["fc1"]
    assert not g.prunable
    assert g.reasons == ("unsupported primitive 'fft' uses it",)
    assert {m.name for m in g.members} == {"fc1/kernel", "fc1/bias"}
    with pytest.raises(
        ValueError, match=r"group 'fc1' is not prunable \(unsupported primitive 'fft'.*fc1/kernel"
    ):
        S.prune(model, {"fc1": np.arange(8) < 4}, x)
    S.prune(model, {"fc1": np.ones(8, bool)}, x)  # an all-True mask is a no-op, allowed


def test_sort_blocks_its_axis_only():
    model, x = _SortNet(rngs=nnx.Rngs(0)), jnp.ones((2, 6))
    groups = S.groups(model, x)
    assert groups["fc1"].reasons == ("sort permutes it",)
    with pytest.raises(ValueError, match=r"group 'fc1' is not prunable \(sort permutes it\)"):
        S.zero(model, {"fc1": np.arange(8) < 4}, x)


def test_control_flow_blocks_groups_and_macs():
    class Loop(nnx.Module):
        def __init__(self, rngs):
            self.fc1, self.fc2 = nnx.Linear(4, 6, rngs=rngs), nnx.Linear(6, 2, rngs=rngs)

        def __call__(self, x):
            _, h = jax.lax.while_loop(
                lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.tanh(c[1])), (0, self.fc1(x))
            )
            return self.fc2(h)

    model, x = Loop(nnx.Rngs(0)), jnp.ones((2, 4))
    assert "unsupported primitive 'while'" in S.groups(model, x)["fc1"].reasons[0]
    with pytest.raises(ValueError, match="while"):
        S.macs(model, x)


def test_bad_input_is_refused_before_work():
    model, x = _case("mlp")
    with pytest.raises(TypeError, match="model must be a flax.nnx.Module"):
        S.groups(lambda x: x, x)
    with pytest.raises(ValueError, match="at least one example input"):
        S.groups(model)
    with pytest.raises(ValueError, match=r"could not trace MLP\(\*inputs\).*\(3, 5\)"):
        S.groups(model, jnp.ones((3, 5)))
    with pytest.raises(TypeError, match="keep must be a mapping"):
        S.prune(model, [True], x)
    with pytest.raises(ValueError, match="unknown group 'layers/9'"):
        S.prune(model, {"layers/9": np.ones(3, bool)}, x)
    with pytest.raises(ValueError, match=r"keep\['layers/0'\] must have shape \(300,\)"):
        S.zero(model, {"layers/0": np.ones(299, bool)}, x)
    with pytest.raises(TypeError, match=r"keep\['layers/0'\] must be a boolean mask"):
        S.prune(model, {"layers/0": np.ones(300)}, x)
    with pytest.raises(ValueError, match=r"removes every one of the group's 300 units"):
        S.prune(model, {"layers/0": np.zeros(300, bool)}, x)
    with pytest.raises(
        ValueError,
        match=r"group 'layers/2' is not prunable \(it is an axis of "
        r"the model output",
    ):
        S.prune(model, {"layers/2": np.arange(10) < 5}, x)
    macs = S.macs(model, x[:1])
    with pytest.raises(ValueError, match="not a prunable group"):
        macs({"layers/2": 3})
    with pytest.raises(ValueError, match=r"kept\['layers/0'\] must be in \[0, 300\]"):
        macs({"layers/0": 301})


def test_prune_refuses_a_module_with_hard_coded_shapes():
    class Fixed(nnx.Module):
        def __init__(self, rngs):
            self.fc1, self.fc2 = nnx.Linear(4, 6, rngs=rngs), nnx.Linear(6, 2, rngs=rngs)

        def __call__(self, x):
            return self.fc2(self.fc1(x).reshape(x.shape[0], 2, 3).reshape(x.shape[0], 6))

    model, x = Fixed(nnx.Rngs(0)), jnp.ones((2, 4))
    keep = {"fc1:1.0": np.array([True, False])}
    groups = S.groups(model, x)
    assert set(groups) >= {"fc1:1.0", "fc1:1.1"}
    # groups() probes every prunable group by tracing the model with one unit removed
    assert "the model does not run with a unit removed" in groups["fc1:1.0"].reasons[0]
    with pytest.raises(ValueError, match="pruned Fixed does not run on the inputs"):
        S.prune(model, keep, x)


@pytest.mark.parametrize(
    "case", [pytest.param("resnet8", marks=pytest.mark.slow), "transformer", "mixnet"]
)
def test_gates_fold_and_prune(case):
    model, x = _case(case)
    groups = S.groups(model, x)
    names = [n for n, g in groups.items() if g.prunable]
    gated = S.Gated(model, names, x)
    y = _forward(model, x)
    np.testing.assert_array_equal(np.asarray(_forward(gated, x)), np.asarray(y))  # gates = 1
    keep = _random_keep(groups, np.random.default_rng(7))
    rng = np.random.default_rng(8)
    for name, mask in keep.items():
        gated.gates[name][...] = jnp.asarray(mask * rng.uniform(0.5, 1.5, mask.shape), jnp.float32)
    folded = _eval(S.fold(gated))
    out = _forward(gated, x)
    np.testing.assert_allclose(np.asarray(_forward(folded, x)), np.asarray(out), atol=1e-5)
    pruned = _eval(S.prune(folded, keep, x))
    np.testing.assert_allclose(np.asarray(_forward(pruned, x)), np.asarray(out), atol=1e-5)
    # 0/1 gates are zero()
    for name, mask in keep.items():
        gated.gates[name][...] = jnp.asarray(mask, jnp.float32)
    zeroed = _eval(S.zero(model, keep, x))
    np.testing.assert_allclose(
        np.asarray(_forward(gated, x)), np.asarray(_forward(zeroed, x)), atol=1e-5
    )
    if case != "transformer":  # one backward compile is enough for the file's time budget
        return
    loss = lambda g: jnp.sum(g(x).astype(jnp.float32) ** 2)  # noqa: E731
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, S.Gate))(gated)
    assert set(grads["gates"]) == set(names)
    assert all(float(jnp.abs(v[...]).sum()) > 0 for v in grads["gates"].values())


def test_gates_keep_batchnorm_updates_and_refuse_bad_input():
    model = jc.models.SmallCNN(widths=(4, 8), rngs=nnx.Rngs(0))
    x = jax.random.normal(_KEY, (4, 8, 8, 1))
    gated = S.Gated(model, ["blocks/0/conv"], x)
    gated.train()
    before = np.asarray(model.blocks[0].bn.mean[...])
    gated(x)
    assert not np.allclose(np.asarray(model.blocks[0].bn.mean[...]), before)
    np.testing.assert_array_equal(  # the weights were restored after the call
        np.asarray(model.blocks[1].conv.kernel[...]),
        np.asarray(nnx.clone(model).blocks[1].conv.kernel[...]),
    )
    with pytest.raises(ValueError, match="unknown group 'nope'"):
        S.Gated(model, ["nope"], x)
    with pytest.raises(ValueError, match=r"cannot gate group 'head': it is not prunable"):
        S.Gated(model, ["head"], x)
    with pytest.raises(TypeError, match="names must be a sequence"):
        S.Gated(model, "blocks/0/conv", x)
    gated.gates["blocks/0/conv"][...] = jnp.array([1.0, -0.1, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"gates\['blocks/0/conv'\] must be finite and non-neg"):
        S.fold(gated)


def test_sharded_params_prune_zero_and_gate():
    mesh = jax.make_mesh((8,), ("m",))
    model = jc.models.MLP(hidden=(64, 32), rngs=nnx.Rngs(0))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("m", None))
    for layer in model.layers[:2]:  # input axes sharded: 784 and 64 rows over 8 devices
        layer.kernel.set_value(jax.device_put(layer.kernel.get_value(), spec))
    x = jax.random.normal(_KEY, (2, 784))
    keep = {"layers/0": np.arange(64) % 3 > 0}
    pruned, zeroed = S.prune(model, keep, x), S.zero(model, keep, x)
    assert zeroed.layers[1].kernel.get_value().sharding.spec == spec.spec  # same shapes: kept
    # the pruned axis (rows of layers/1: 42, not a multiple of 8) becomes replicated
    assert pruned.layers[1].kernel.get_value().shape == (42, 32)
    assert pruned.layers[0].kernel.get_value().sharding.spec[0] == "m"  # other axes keep theirs
    np.testing.assert_allclose(np.asarray(pruned(x)), np.asarray(zeroed(x)), atol=1e-5)
    gated = S.Gated(model, ["layers/0"], x)
    gated.gates["layers/0"][...] = jnp.asarray(keep["layers/0"], jnp.float32)
    np.testing.assert_allclose(np.asarray(gated(x)), np.asarray(zeroed(x)), atol=1e-5)


def _contractions(jaxpr):
    """``(primitive, operand shapes, feature_group_count)`` of every contraction, in order."""
    out = []
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("dot_general", "conv_general_dilated"):
            shapes = tuple(tuple(v.aval.shape) for v in eqn.invars)
            out.append((name, shapes, eqn.params.get("feature_group_count")))
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    out.extend(_contractions(inner))
    return out


@pytest.mark.parametrize("case", ["mixnet", "transformer"])
def test_mac_count_ops_give_the_pruned_models_contraction_shapes(case):
    model, x = _case(case)
    macs = S.macs(model, x)
    groups = S.groups(model, x)
    keep = _random_keep(groups, np.random.default_rng(4))
    kept = {n: int(m.sum()) for n, m in keep.items() if n in macs.sizes}
    pruned = S.prune(model, keep, x)
    view = nnx.view(pruned, deterministic=True, use_running_average=True, raise_if_not_found=False)
    graphdef, state = nnx.split(view)
    jaxpr = jax.make_jaxpr(lambda s, a: nnx.merge(graphdef, s)(a))(state, x).jaxpr
    want = _contractions(jaxpr)
    got = [
        (
            op.primitive.name,
            op.operand_shapes(kept, macs.sizes),
            op.op_params(kept, macs.sizes).get("feature_group_count"),
        )
        for op in macs.ops
    ]
    assert got == want
    assert sum(S.MacCount(op.macs, macs.sizes)(kept) for op in macs.ops) == macs(kept)
    for op in macs.ops:
        assert set(op.groups) <= set(macs.sizes)
