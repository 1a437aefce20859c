"""jc.prune.structured / unit_scores: group-norm structured one-shot pruning of any NNX model."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from structured_models import (
    case_input,
    case_model,
    resblock_macs,
)

import jaxcompress as jc

_KEY = jax.random.key(3)


@functools.cache
def _case(name):
    """Each model and a 2-example input, built once (initialisation dominates test time)."""
    model, x = case_model(name), case_input(name, _KEY, 2)
    return model, x, jc.structure.groups(model, x)


@nnx.jit
def _forward(model, x):
    return model(x)


def _value(model, path):
    node = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return np.asarray(node[...], np.float64)


def test_scores_equal_hand_computed_group_norms():
    model, x, groups = _case("resblock")
    scores = jc.prune.unit_scores(model, groups_ := {n: groups[n] for n in ("conv1", "expand")})
    l1 = jc.prune.unit_scores(model, groups_, "l1")
    k1, k2 = _value(model, ("conv1", "kernel")), _value(model, ("conv2", "kernel"))
    s, b = _value(model, ("bn1", "scale")), _value(model, ("bn1", "bias"))
    for u in range(6):  # conv1's output filter, bn1's scale and bias, conv2's input rows
        parts = [k1[..., u], s[u], b[u], k2[:, :, u, :]]
        np.testing.assert_allclose(
            scores["conv1"][u], math.sqrt(sum(np.sum(p**2) for p in parts)), rtol=1e-6
        )
        np.testing.assert_allclose(l1["conv1"][u], sum(np.abs(p).sum() for p in parts), rtol=1e-6)
    # through the depthwise conv: expand's filter, bn3, dw's filter, bn4, project's input rows
    e = [_value(model, p) for p in (("expand", "kernel"), ("dw", "kernel"), ("project", "kernel"))]
    bns = [_value(model, (bn, w)) for bn in ("bn3", "bn4") for w in ("scale", "bias")]
    for u in range(12):
        sq = np.sum(e[0][..., u] ** 2) + np.sum(e[1][..., u] ** 2) + np.sum(e[2][:, :, u] ** 2)
        sq += sum(v[u] ** 2 for v in bns)
        np.testing.assert_allclose(scores["expand"][u], math.sqrt(sq), rtol=1e-6)


def test_head_scores_gather_qkv_and_output_projection():
    model, _, groups = _case("transformer")
    name = "blocks/0/attn/query:1"
    score = jc.prune.unit_scores(model, {name: groups[name]})[name]
    attn = model.blocks[0].attn
    for h in range(4):  # kernels (d, heads, head_dim), biases (heads, head_dim), out (heads, hd, d)
        sq = sum(
            np.sum(np.asarray(getattr(attn, p).kernel[...], np.float64)[:, h] ** 2)
            + np.sum(np.asarray(getattr(attn, p).bias[...], np.float64)[h] ** 2)
            for p in ("query", "key", "value")
        )
        sq += np.sum(np.asarray(attn.out.kernel[...], np.float64)[h] ** 2)
        np.testing.assert_allclose(score[h], math.sqrt(sq), rtol=1e-6)


@pytest.mark.parametrize("case", ["resblock", "convnext", "resnet8", "transformer"])
def test_structured_equals_zero_and_macs_match(case):
    model, x, groups = _case(case)
    small, masks = jc.prune.structured(model, 0.5, x, score="l1" if case == "convnext" else "l2")
    prunable = {n: g for n, g in groups.items() if g.prunable}
    assert set(masks) == set(prunable)
    scores = jc.prune.unit_scores(model, prunable, "l1" if case == "convnext" else "l2")
    for n, m in masks.items():
        assert m.sum() == math.ceil(prunable[n].size / 2)
        if not m.all():
            assert scores[n][m].min() >= scores[n][~m].max()  # the best units are kept
    zeroed = jc.structure.zero(model, masks, x)
    zeroed.eval()
    y, ref, dense = _forward(small, x), _forward(zeroed, x), _forward(model, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-5, rtol=0)
    assert float(jnp.max(jnp.abs(ref - dense))) > 1e-4  # pruning changed the function
    kept = {n: int(m.sum()) for n, m in masks.items()}
    assert jc.structure.macs(small, x[:1]).dense == jc.structure.macs(model, x[:1])(kept)
    if case == "resblock":  # independent oracle: the hand count of the docstring
        assert jc.structure.macs(small, x[:1]).dense == resblock_macs(64, 4, 3, 6)


def test_per_group_counts_and_fractions():
    model, x, groups = _case("resblock")
    small, masks = jc.prune.structured(model, {"conv1": 2, "expand": 0.25}, x)
    assert {n: int(m.sum()) for n, m in masks.items()} == {"conv1": 2, "expand": 3}
    assert small.conv1.out_features == 2 and small.dw.feature_group_count == 3
    assert small.stem.out_features == 8  # not named: whole
    zeroed = jc.structure.zero(model, masks, x)
    np.testing.assert_allclose(
        np.asarray(_forward(small, x)), np.asarray(_forward(zeroed, x)), atol=1e-5, rtol=0
    )
    own = {"conv1": np.arange(6.0)}  # user scores: the highest indices win
    _, masks = jc.prune.structured(model, {"conv1": 2}, x, score=own)
    np.testing.assert_array_equal(masks["conv1"], [False] * 4 + [True] * 2)


def test_batchnorm_recalibration_after_pruning():
    model, x, _ = _case("resblock")
    batches = [jax.random.normal(jax.random.key(i), (4, 8, 8, 3)) for i in range(2)]
    plain, _ = jc.prune.structured(model, 0.5, x)
    tuned, _ = jc.prune.structured(model, 0.5, x, calibration=batches)
    assert plain.bn1.mean.shape == (3,)
    assert not np.allclose(np.asarray(plain.bn1.mean[...]), np.asarray(tuned.bn1.mean[...]))
    assert tuned.bn1.use_running_average  # left in eval mode


def test_bad_input_is_refused_before_pruning(monkeypatch):
    model, x, _ = _case("resblock")

    def boom(*a, **k):
        raise AssertionError("structure.prune must not run on bad input")

    monkeypatch.setattr(jc.structure, "prune", boom)
    for keep, err, match in [
        (0.0, ValueError, r"keep must be a kept fraction in \(0, 1\], got 0.0"),
        (1.5, ValueError, "got 1.5"),
        (True, TypeError, "kept fraction"),
        ({"conv1": 0}, ValueError, r"keep\['conv1'\] must keep at least one unit"),
        ({"conv1": 7}, ValueError, "exceeds the group's 6 units"),
        ({"conv1": -0.5}, ValueError, r"keep\['conv1'\] must be a kept fraction"),
        ({"conv9": 2}, ValueError, "unknown group 'conv9'"),
        ({"head": 2}, ValueError, "group 'head' is not prunable .*model output"),
    ]:
        with pytest.raises(err, match=match):
            jc.prune.structured(model, keep, x)
    with pytest.raises(ValueError, match="score must be one of"):
        jc.prune.structured(model, 0.5, x, score="l3")
    with pytest.raises(ValueError, match=r"score\['conv1'\] must be 6 finite unit scores"):
        jc.prune.structured(model, {"conv1": 2}, x, score={"conv1": np.ones(5)})
    with pytest.raises(TypeError, match="flax.nnx.Module"):
        jc.prune.structured({"w": np.ones(3)}, 0.5, x)
    groups = _case("resblock")[2]
    with pytest.raises(ValueError, match="score must be one of"):
        jc.prune.unit_scores(model, groups, "l3")
    with pytest.raises(TypeError, match="groups must map names to jaxcompress.structure.Group"):
        jc.prune.unit_scores(model, {"conv1": 6})
    convnext, xc, _ = _case("convnext")
    with pytest.raises(ValueError, match="has no nnx.BatchNorm"):
        jc.prune.structured(convnext, 0.5, xc, calibration=[xc])
