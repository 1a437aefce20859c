"""jc.spdy.group_options: SPDY channel tables, errors and profiles on any model's groups."""

from __future__ import annotations

import functools
import subprocess
import sys

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

_KEY = jax.random.key(5)


@functools.cache
def _case(name):
    """(model, one-example input for MACs, calibration batch), built once."""
    x = case_input(name, _KEY, 2 if name == "resnet8" else 4)
    return case_model(name), x[:1], x


@functools.cache
def _options(name, groups=None, levels=(1.0, 0.75, 0.5, 0.25)):
    model, x1, _ = _case(name)
    return jc.spdy.group_options(model, x1, levels=levels, groups=groups)


@nnx.jit
def _forward(model, x):
    return model(x)


def _predicted(table, choice):
    fixed = table.base - table.prunable
    return fixed + sum(t[j] for t, j in zip(table.times(), choice, strict=True))


def test_resblock_table_is_the_hand_count_and_dp_meets_the_budget():
    model, x1, xc = _case("resblock")
    opts = _options("resblock", ("conv1", "expand"))  # the block's inner and depthwise groups
    assert opts.counts == {"conv1": (6, 5, 3, 2), "expand": (12, 9, 6, 3)}
    hw, dense = 64, resblock_macs(64, 8, 6, 12)
    assert opts.table.base == dense
    # t_g(k): the multiply-adds that scale with group g (docstring of structured_models)
    np.testing.assert_array_equal(
        opts.table["conv1"].times, [hw * 18 * 8 * k for k in (6, 5, 3, 2)]
    )
    np.testing.assert_array_equal(
        opts.table["expand"].times, [hw * (8 + 9 + 8) * k for k in (12, 9, 6, 3)]
    )
    budget = jc.spdy.budget(opts.table, 1.3)
    sol = jc.spdy.solve(opts.errors(xc), opts.table.times(), budget)
    choice = np.asarray(sol.choice)
    kept = opts.kept(choice)
    small = opts.prune(choice)
    macs = jc.structure.macs(small, x1).dense
    assert (
        macs
        == resblock_macs(64, 8, kept["conv1"], kept["expand"])
        == _predicted(opts.table, choice)
    )
    assert macs <= dense / 1.3 and macs > dense / 2  # meets the budget, not trivially
    assert small.conv1.out_features == kept["conv1"] and small.dw.in_features == kept["expand"]
    np.testing.assert_allclose(
        np.asarray(_forward(small, xc)), np.asarray(opts.apply(choice, xc)), atol=1e-5, rtol=0
    )


def test_default_groups_are_the_heaviest_independent_set():
    opts = _options("resblock")
    # the residual stream (stem) shares terms with conv1 and expand, and outweighs both together
    assert opts.names == ("stem",)
    macs = opts.macs
    share = {n: macs.dense - macs({n: 0}) for n in ("stem", "conv1", "expand")}
    assert share["stem"] > share["conv1"] + share["expand"]
    t = _options("transformer")
    assert t.names == tuple(
        f"blocks/{i}/{n}" for i in range(2) for n in ("attn/query:1", "mlp_in")
    )  # heads and FFN units; each value head_dim group shares the heads' terms


@pytest.mark.parametrize("case", ["convnext", "transformer", "resnet8"])
def test_random_profiles_prune_to_the_table_macs(case):
    model, x1, xc = _case(case)
    opts = _options(case)
    if case == "resnet8":  # the inner group of every block: the stage streams share their terms
        assert opts.names == ("stages/0/0/conv1", "stages/1/0/conv1", "stages/2/0/conv1")
    rng = np.random.default_rng(0)
    for _ in range(2):
        choice = np.array([rng.integers(len(opts.counts[n])) for n in opts.names])
        small = opts.prune(choice)
        assert jc.structure.macs(small, x1).dense == _predicted(opts.table, choice)
        assert jc.structure.macs(small, x1).dense == opts.macs(opts.kept(choice))
        np.testing.assert_allclose(
            np.asarray(_forward(small, xc)), np.asarray(opts.apply(choice, xc)), atol=1e-5
        )


def test_errors_equal_the_zeroed_model_output_error():
    model, _, xc = _case("convnext")
    opts = _options("convnext")
    errors = opts.errors(xc)
    ref = np.asarray(_forward(model, xc), np.float64)
    for i, name in enumerate(opts.names):
        assert errors[i][0] == 0
        for j, k in enumerate(opts.counts[name]):
            keep = np.zeros(16, bool)
            keep[np.argsort(-opts.scores[name], kind="stable")[:k]] = True
            y = np.asarray(_forward(jc.structure.zero(model, {name: keep}, xc), xc), np.float64)
            want = np.sum((y - ref) ** 2) / np.sum(ref**2)
            np.testing.assert_allclose(errors[i][j], want, rtol=1e-4, atol=1e-9)
        assert errors[i][-1] > 0


def test_measured_table_and_search():
    model, x1, xc = _case("convnext")
    opts = _options("convnext", levels=(1.0, 0.5))
    table = opts.measure(xc, repeats=3, warmup=1)
    assert table.names == opts.names and table.labels() == opts.table.labels()
    assert table.base > 0 and table.base >= table.prunable
    for layer in table.layers:
        assert np.all(np.isfinite(layer.times)) and np.all(layer.times >= 0)
        assert layer.noise is not None
    # the DP and SPDY's search run on either table; the search scores profiles by output error
    errors = opts.errors(xc)
    ref = _forward(model, xc)

    def score(choice):
        return float(jnp.mean((opts.apply(choice, xc) - ref) ** 2))

    budget = jc.spdy.budget(opts.table, 1.2)
    res = jc.spdy.search(
        errors, opts.table, budget, score, randinits=4, maxnoimp=2, dp_batch=4, progress=False
    )
    assert _predicted(opts.table, res.choice) <= opts.table.base / 1.2
    assert res.score == score(res.choice)


def test_bad_input_is_refused_before_work():
    model, x1, _ = _case("resblock")
    for kwargs, err, match in [
        (dict(levels=(0.5, 1.0)), ValueError, r"levels\[0\] must be 1.0"),
        (dict(levels=(1.0, 0.0)), ValueError, r"levels\[1\] must be a kept fraction in \(0, 1\]"),
        (dict(levels=1.0), TypeError, "levels must be a non-empty sequence"),
        (dict(groups=["conv9"]), ValueError, "unknown group 'conv9'"),
        (dict(groups=["head"]), ValueError, "group 'head' is not prunable"),
        (dict(groups=["conv1", "conv1"]), ValueError, "distinct groups"),
        (dict(groups=["stem", "conv1"]), ValueError, "'conv1' and 'stem' share multiply-adds"),
        (dict(groups="stem"), TypeError, "sequence of group names"),
        (dict(score="l3"), ValueError, "score must be one of"),
        (dict(score={"stem": np.ones(3)}), ValueError, r"score\['stem'\] must be 8 finite"),
    ]:
        with pytest.raises(err, match=match):
            jc.spdy.group_options(model, x1, **kwargs)
    opts = _options("resblock", ("conv1", "expand"))
    with pytest.raises(ValueError, match=r"choice must hold one option index per layer \(2 ints\)"):
        opts.keep([0])
    with pytest.raises(ValueError, match=r"choice for 'expand' must be in \[0, 4\), got 4"):
        opts.prune([0, 4])


def test_spdy_import_is_flax_free_until_group_options_is_used():
    """``jc.spdy`` sees pytrees and arrays; only the structured options need Flax."""
    code = (
        "import sys, jaxcompress.spdy as S\n"
        "assert 'flax' not in sys.modules, 'import jaxcompress.spdy loaded flax'\n"
        "assert S.group_options.__module__ == 'jaxcompress.spdy._groups'\n"
        "assert 'flax' in sys.modules\n"
        "try:\n"
        "    S.not_a_name\n"
        "except AttributeError as e:\n"
        "    assert 'not_a_name' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
