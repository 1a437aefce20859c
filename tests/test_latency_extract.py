"""Gating, extraction, width policies, uniform-width baselines and factorisation on any model
(jaxcompress.latency on jaxcompress.structure), against structure.zero and hand counts."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxcompress as jc
import jaxcompress.latency as L
from jaxcompress import structure as S
from tests.test_structure import PRUNABLE, _case, _forward, jaxpr_macs

# ---------------------------------------------------------------------------------------------
# Hand counts of multiply-adds per example from the kept counts
# ---------------------------------------------------------------------------------------------


def _mlp_macs(k):
    h0, h1 = k["layers/0"], k["layers/1"]
    return 784 * h0 + h0 * h1 + h1 * 10


def _cnn_macs(k):  # 28x28 -> conv s2 14x14 -> pool 7x7 -> conv -> pool 4x4 -> conv -> GAP
    c0, c1, c2 = k["blocks/0/conv"], k["blocks/1/conv"], k["blocks/2/conv"]
    return 196 * 9 * c0 + 49 * 9 * c0 * c1 + 16 * 9 * c1 * c2 + 10 * c2


def _resnet8_macs(k):  # 16x16 stage 0, 8x8 stage 1, 4x4 stage 2; 1x1 projection shortcuts
    s0, s1, s2 = k["stem_conv"], k["stages/1/0/conv2"], k["stages/2/0/conv2"]
    m0, m1, m2 = k["stages/0/0/conv1"], k["stages/1/0/conv1"], k["stages/2/0/conv1"]
    total = 256 * 9 * 3 * s0 + 256 * 9 * (s0 * m0 + m0 * s0)
    total += 64 * (9 * s0 * m1 + 9 * m1 * s1 + s0 * s1)
    total += 16 * (9 * s1 * m2 + 9 * m2 * s2 + s1 * s2)
    return total + 10 * s2


def _convnext_macs(k):  # stem 2x2/2 to 8x8x8, per block dw 7x7 and two pointwise, head
    return (
        64 * 8 * 12 + sum(64 * 8 * 49 + 2 * 64 * 8 * k[f"blocks/{i}/pwconv1"] for i in (0, 1)) + 40
    )


_HAND = {"mlp": _mlp_macs, "cnn": _cnn_macs, "resnet8": _resnet8_macs, "convnext": _convnext_macs}


def _random_gates(g, rng):
    for gate in g.gates.values():
        n = gate.shape[0]
        a = rng.uniform(0.0, 1.0, n) * (rng.uniform(size=n) < rng.uniform(0.4, 0.9))
        a[rng.integers(n)] = rng.uniform(0.5, 1.0)  # at least one clear survivor
        a[rng.integers(n)] = 1e-4  # non-zero but below the threshold: removed
        gate[...] = jnp.asarray(a, jnp.float32)


@pytest.mark.parametrize("case", ["mlp", "cnn", "resnet8", "transformer", "convnext", "vit"])
def test_gated_model_is_the_model_and_extraction_is_exact(case):
    model, x = _case(case)
    g = L.gated(model, x)
    assert {n: int(v.shape[0]) for n, v in g.gates.items()} == PRUNABLE[case]
    np.testing.assert_allclose(_forward(g, x), _forward(model, x), atol=1e-5, rtol=1e-5)
    _random_gates(g, np.random.default_rng(0))
    ex = L.extract(g, x)
    for name, a in g.gates.items():
        a = np.asarray(a[...])
        want = np.flatnonzero((a >= 1e-2 * a.max()) & (a > 0))
        np.testing.assert_array_equal(np.flatnonzero(ex.keep[name]), want)
        assert ex.kept[name] == want.size
    reference = S.zero(S.fold(g), ex.keep, x)
    np.testing.assert_allclose(_forward(ex.model, x), _forward(reference, x), atol=1e-5)
    assert type(ex.model) is type(model)
    assert ex.macs == jaxpr_macs(ex.model, x[:1]) == S.macs(model, x[:1])(ex.kept)
    if case in _HAND:
        assert ex.macs == _HAND[case](ex.kept)


def test_extraction_rounded_to_a_multiple_is_exact_and_zero_pads():
    model, x = _case("cnn")
    g = L.gated(model, x)
    rng = np.random.default_rng(1)
    _random_gates(g, rng)
    ex = L.extract(g, x, policy=[L.round_to_multiple(8)])
    for name, gate in g.gates.items():
        size = gate.shape[0]
        assert ex.kept[name] % 8 == 0 or ex.kept[name] == size
        a = np.asarray(gate[...])
        above = (a >= 1e-2 * a.max()) & (a > 0)
        assert ex.keep[name][above].all()  # every thresholded unit survives
        removed = a[~ex.keep[name]]  # the added units are the largest removed gates
        added = a[ex.keep[name] & ~above]
        assert added.size == 0 or removed.size == 0 or added.min() >= removed.max()
    reference = S.zero(S.fold(g), ex.keep, x)
    np.testing.assert_allclose(_forward(ex.model, x), _forward(reference, x), atol=1e-5)
    assert ex.macs == _cnn_macs(ex.kept)
    per_group = L.extract(g, x, policy=L.round_to_multiple({"blocks/1/conv": 16}))
    assert per_group.kept["blocks/1/conv"] % 16 == 0


def test_within_budget_never_exceeds_the_budget():
    model, x = _case("cnn")
    macs = S.macs(model, x[:1])
    rng = np.random.default_rng(2)
    gates = {n: rng.uniform(0, 1, s) for n, s in macs.sizes.items()}
    ctx = types.SimpleNamespace(sizes=macs.sizes, gates=gates, macs=macs, tau=0.01)
    start = dict(macs.sizes)
    for frac in (0.9, 0.5, 0.2, 0.05):
        for m in (1, 4):
            budget = frac * macs.dense
            pol = L.within_budget(budget, multiple=m)
            counts = pol(dict(start), ctx)
            assert _cnn_macs(counts) <= budget
            assert all(c % m == 0 or c == macs.sizes[n] for n, c in counts.items())
            assert all(1 <= c <= macs.sizes[n] for n, c in counts.items())
            # maximal: raising any lowered group by one more step would break the budget
            for n, c in counts.items():
                if c < start[n]:
                    up = min(start[n], (c // m) * m + m)
                    assert _cnn_macs({**counts, n: up}) > budget, (frac, m, n, c)
    # least relative gate mass per MAC saved goes first: a group of zero gates is cut first
    zero_last = dict(gates, **{"blocks/2/conv": np.zeros(128)})
    ctx0 = types.SimpleNamespace(sizes=macs.sizes, gates=zero_last, macs=macs, tau=0.01)
    counts = L.within_budget(0.9 * macs.dense)(dict(start), ctx0)
    assert counts["blocks/0/conv"] == 32 and counts["blocks/1/conv"] == 64
    with pytest.raises(ValueError, match="below the cheapest model"):
        L.within_budget(1.0, multiple=8)(dict(start), ctx)
    # a loss criterion is called with the keep masks of each trial
    seen = []

    def loss(keep):
        seen.append({n: int(m.sum()) for n, m in keep.items()})
        return -float(sum(m.sum() for m in keep.values()))

    counts = L.within_budget(0.8 * macs.dense, criterion=loss)(dict(start), ctx)
    assert _cnn_macs(counts) <= 0.8 * macs.dense and seen
    # through extract: the budget holds for the extracted model
    g = L.gated(model, x)
    _random_gates(g, rng)
    ex = L.extract(g, x, policy=[L.round_to_multiple(4), L.within_budget(3e5, multiple=4)])
    assert ex.macs <= 3e5 and all(c % 4 == 0 for c in ex.kept.values())


def test_pad_to_fast_widens_to_a_faster_grid_width_and_stays_exact():
    model, x = _case("cnn")
    g = L.gated(model, x)
    g.gates["blocks/1/conv"][...] = jnp.zeros(64).at[:10].set(1.0)
    ax = np.array([16.0, 32.0, 48.0, 64.0])
    lat = L.LatencyModel(
        (("conv1", ("blocks/1/conv",), (ax,), np.array([3.0, 2.0, 1.0, 4.0])),),
        {"blocks/1/conv": 64},
    )
    ex = L.extract(g, x, policy=L.pad_to_fast(lat))
    assert ex.kept["blocks/1/conv"] == 48  # 10 -> 48, the fastest width at least as wide
    np.testing.assert_allclose(_forward(ex.model, x), _forward(g, x), atol=1e-5)
    wrong = L.LatencyModel(
        (("t", ("blocks/1/conv",), (ax[:2],), np.ones(2)),), {"blocks/1/conv": 32}
    )
    with pytest.raises(ValueError, match="measured with 32"):
        L.extract(g, x, policy=L.pad_to_fast(wrong))


@pytest.mark.parametrize("scale", [0.25, 0.5])
def test_uniform_width_counts(scale):
    model, x = _case("cnn")
    small = L.uniform_width(model, scale, x)
    kept = {"blocks/0/conv": 32, "blocks/1/conv": 64, "blocks/2/conv": 128}
    kept = {n: round(scale * s) for n, s in kept.items()}
    assert [b.conv.out_features for b in small.blocks] == list(kept.values())
    assert S.macs(small, x[:1]).dense == _cnn_macs(kept) == jaxpr_macs(small, x[:1])
    model, x = _case("mlp")
    rounded = L.uniform_width(model, scale, x, policy=L.round_to_multiple(16))
    want = {n: -(-round(scale * s) // 16) * 16 for n, s in (("layers/0", 300), ("layers/1", 100))}
    assert S.macs(rounded, x[:1]).dense == _mlp_macs(want)
    only = L.uniform_width(model, scale, x, select=lambda name, grp: name == "layers/1")
    assert S.macs(only, x[:1]).dense == _mlp_macs({"layers/0": 300, "layers/1": round(scale * 100)})


def test_factorize_at_full_rank_is_the_model_and_rank_gates_extract_exactly():
    model = jc.models.MLP(in_features=48, hidden=(24, 12), num_classes=5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (3, 48))
    fact = L.factorize(model, x)
    assert all(isinstance(layer, L.Factorized) for layer in fact.layers)
    assert [layer.rank for layer in fact.layers] == [24, 12, 5]
    np.testing.assert_allclose(_forward(fact, x), _forward(model, x), atol=1e-4, rtol=1e-4)
    # a truncated rank is the truncated SVD of the kernel
    low = L.factorize(model, x, rank=8, select=lambda path, layer: path == ("layers", 0))
    w = np.asarray(model.layers[0].kernel[...], np.float64)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    got = np.asarray(low.layers[0].u.kernel[...]) @ np.asarray(low.layers[0].v.kernel[...])
    np.testing.assert_allclose(got, (u[:, :8] * s[:8]) @ vt[:8], atol=1e-4)
    assert isinstance(low.layers[1], nnx.Linear)
    # the rank axis is a group: gate it, extract it
    g = L.gated(low, x, select=lambda name, grp: name.endswith("/u"))
    assert set(g.gates) == {"layers/0/u"}
    g.gates["layers/0/u"][...] = jnp.array([1.0, 0.0, 0.5, 0.0, 0.2, 0.0, 0.0, 0.9])
    ex = L.extract(g, x)
    assert ex.model.layers[0].rank == 4
    np.testing.assert_allclose(_forward(ex.model, x), _forward(g, x), atol=1e-5)
    # on a model defined only in the tests: the ViT's MLP layers
    vit, xv = _case("vit")
    fv = L.factorize(vit, xv, select=lambda path, layer: path[0] in ("fc1", "fc2"))
    assert isinstance(fv.fc1[0], L.Factorized) and isinstance(fv.attn[0].qkv, nnx.Linear)
    np.testing.assert_allclose(_forward(fv, xv), _forward(vit, xv), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="rank"):
        L.factorize(model, x, rank=0)
    with pytest.raises(ValueError, match="no nnx.Linear"):
        L.factorize(model, x, select=lambda path, layer: False)


def test_extracted_model_round_trips_through_orbax(tmp_path):
    model, x = _case("resnet8")
    g = L.gated(model, x)
    _random_gates(g, np.random.default_rng(3))
    ex = L.extract(g, x)
    with jc.checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(0, model_state=nnx.state(ex.model))
        skeleton = S.prune(jc.models.resnet8(rngs=nnx.Rngs(5)), ex.keep, x)
        target = {"model_state": jax.eval_shape(lambda: nnx.state(skeleton))}
        restored = ckpt.restore(target=target)
    nnx.update(skeleton, restored["model_state"])
    skeleton.eval()
    np.testing.assert_array_equal(
        np.asarray(_forward(skeleton, x)), np.asarray(_forward(ex.model, x))
    )


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors before any work
# ---------------------------------------------------------------------------------------------


def test_bad_input_is_refused_with_the_argument_named():
    model, x = _case("mlp")
    groups = S.groups(model, x)
    blocked = next(n for n, grp in groups.items() if not grp.prunable)
    with pytest.raises(ValueError, match="unknown group 'nope'"):
        S.Gated(model, ["nope"], x)
    with pytest.raises(ValueError, match=f"cannot gate group '{blocked}'.*not prunable"):
        S.Gated(model, [blocked], x)
    with pytest.raises(ValueError, match="could not trace"):
        L.gated(model, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="no group of MLP to gate"):
        L.gated(model, x, select=lambda name, grp: False)
    g = L.gated(model, x)
    g.gates["layers/1"][...] = g.gates["layers/1"][...].at[3].set(-0.1)
    with pytest.raises(ValueError, match=r"gates\['layers/1'\] must be finite and >= 0"):
        L.extract(g, x)
    g.gates["layers/1"][...] = jnp.ones(100)
    with pytest.raises(TypeError, match="structure.Gated"):
        L.extract(model, x)
    with pytest.raises(ValueError, match="tau"):
        L.extract(g, x, tau=1.0)
    with pytest.raises(TypeError, match="policy"):
        L.extract(g, x, policy="round")
    with pytest.raises(ValueError, match="unknown groups"):
        L.extract(g, x, policy=L.round_to_multiple({"nope": 8}))
    with pytest.raises(ValueError, match="outside"):
        L.extract(g, x, policy=lambda kept, ctx: {n: 0 for n in kept})
    with pytest.raises(ValueError, match="multiple must be an int >= 1"):
        L.round_to_multiple(0)
    with pytest.raises(ValueError, match="budget_macs"):
        L.within_budget(0)
    with pytest.raises(ValueError, match="scale"):
        L.uniform_width(model, 0.0, x)
    with pytest.raises(ValueError, match="scale"):
        L.uniform_width(model, 1.5, x)


def test_uniform_width_on_a_model_defined_in_the_tests():
    vit, x = _case("vit")
    half = L.uniform_width(vit, 0.5, x)
    assert [a.qkv.out_features for a in half.attn] == [3 * 2 * 4] * 2  # 2 of 4 heads of 4 dims
    assert [f.out_features for f in half.fc1] == [16, 16]
    assert _forward(half, x).shape == _forward(vit, x).shape
    kept = {n: s // 2 for n, s in PRUNABLE["vit"].items()}
    assert S.macs(half, x[:1]).dense == jaxpr_macs(half, x[:1]) == S.macs(vit, x[:1])(kept)
