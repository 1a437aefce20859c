"""The SPDY experiment runs end to end on a tiny real setting and keeps its schema; its
functional SmallCNN matches the Flax model, channel units are independent, slicing a unit
matches masking its consumer's inputs, and the unit timing builders run the model's own
computation."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import tiny_config
from flax import nnx

from experiments._common import load_datasets
from experiments.spdy import model as fmodel
from experiments.spdy import train as train_mod
from experiments.spdy.configs import default, quick
from experiments.spdy.configs.base import Config
from experiments.spdy.train import (
    FAMILIES,
    METHODS,
    _train_or_restore,
    format_table,
    input_channel_mask,
    levels,
    run,
    sparse_runtime_curve,
)
from jaxcompress import train as jtrain
from jaxcompress.masks import keep_count
from jaxcompress.models import SmallCNN


def _tiny() -> Config:
    return tiny_config(
        quick,
        epochs=2,
        widths=(8, 16, 16),
        strides=(1, 2, 1),
        pool_after=(False, False, False),
        train_subset=None,
        test_subset=None,
        speedups=(1.2, 2.0),
        num_levels=3,
        calib_samples=64,
        adaprune_epochs=1,
        gap_epochs=1,
        randinits=3,
        maxnoimp=1,
        timing_repeats=1,
        timing_batch=32,
        buckets=500,
    )


@pytest.mark.parametrize("search_gap_epochs", [0, 1])
def test_run_writes_schema_and_files(tmp_path, monkeypatch, search_gap_epochs):
    # An 8x8-image model saves almost nothing by narrowing (dispatch dominates), so its measured
    # structured targets may all be unreachable. Measure the real table, then scale each
    # unit's narrower entries with its channel count so the profile path runs too.
    real = train_mod._measured_table

    def table_with_reachable_targets(arch, params, stats, x, lv, config, **kwargs):
        table = real(arch, params, stats, x, lv, config, **kwargs)
        layers = []
        for layer, u in zip(table.layers, fmodel.units(arch), strict=True):
            width = params["blocks"][u.producer]["conv"]["kernel"].shape[-1]
            frac = np.array([keep_count(width, s) / width for s in lv])
            layers.append(dataclasses.replace(layer, times=layer.times[0] * frac))
        return dataclasses.replace(table, base=table.prunable * 1.25, layers=tuple(layers))

    monkeypatch.setattr(train_mod, "_measured_table", table_with_reachable_targets)
    results = run(_tiny().replace(search_gap_epochs=search_gap_epochs), tmp_path)
    assert 0.3 < results["dense_accuracy"] <= 1.0
    assert set(results["families"]) == set(FAMILIES)
    unstr = results["families"]["unstructured_flops"]
    assert unstr["layers"] == [
        "blocks/0/conv/kernel",
        "blocks/1/conv/kernel",
        "blocks/2/conv/kernel",
        "head/kernel",
    ]
    for target in ("1.2", "2"):
        entry = unstr["targets"][target]
        hist = np.asarray(entry["search"]["history"])
        assert np.all(np.diff(hist) <= 0) and entry["search"]["monotone"]
        assert results["summary"]["unstructured_flops"]["targets"][target]["search_monotone"]
        for method in METHODS:
            e = entry[method]
            assert e["modelled_speedup"] >= float(target) * (1 - 1e-9)
            assert 0.0 <= e["accuracy_layerwise"] <= 1.0 and 0.0 <= e["accuracy_gap"] <= 1.0
            assert e["measured_seconds"] > 0
        if search_gap_epochs == 0:  # the reference's score: the stitched calibration loss
            assert entry["spdy"]["calib_loss"] == pytest.approx(entry["search"]["score"])
        else:  # scored after a short global AdaPrune
            assert entry["search"]["score_after_gap_epochs"] == search_gap_epochs
            assert np.isfinite(entry["search"]["score"])
    curve = results["families"]["unstructured_rn50_curve"]
    assert curve["layers"] == unstr["layers"]
    assert curve["database"] == unstr["database"]  # one database, two timing tables
    rel = sparse_runtime_curve(results["levels"])
    for a, b in zip(curve["table"]["layers"], unstr["table"]["layers"], strict=True):
        np.testing.assert_allclose(a["times"], b["times"][0] * rel, rtol=1e-12)
    struct = results["families"]["structured_measured"]
    # units: block 2 -> head, block 0 -> block 1 (block 1's outputs are never pruned)
    assert struct["layers"] == ["blocks/1/conv/kernel", "head/kernel"]
    assert [u["producer"] for u in struct["units"]] == ["blocks/0", "blocks/2"]
    assert len(struct["table"]["layers"]) == len(struct["table_alternative"]["layers"]) == 2
    assert struct["table_kind"] == "isolated"
    alt = results["summary"]["structured_measured"]["measured_over_predicted"]
    assert alt["table"] == "isolated" and alt["alternative_table"]["kind"] == "context"
    assert struct["fixed_seconds"] >= 0 and struct["max_speedup"] > 1
    assert not struct["targets"]["1.2"].get("unreachable")
    for entry in struct["targets"].values():
        if entry.get("unreachable"):
            assert entry["max_speedup"] == pytest.approx(struct["max_speedup"])
            continue
        for method in METHODS:
            e = entry[method]
            if e.get("infeasible"):
                continue
            assert e["predicted_seconds"] > 0 and e["measured_over_predicted_seconds"] > 0
            assert e["measured_over_predicted_alternative"] > 0
            kept = [keep_count(c, float(e["profile"][n])) for c, n in
                    zip((8, 16), struct["layers"], strict=True)]  # fmt: skip
            assert e["channels"] == kept
    assert "measured_over_predicted" in results["summary"]["structured_measured"]
    agree = results["summary"]["structured_measured"]["speedup_agreement"]
    speedups = [
        entry[m]["measured_over_modelled_speedup"]
        for entry in struct["targets"].values()
        if not entry.get("unreachable")
        for m in METHODS
        if not entry[m].get("infeasible")
    ]
    assert agree["min"] == min(speedups) and agree["max"] == max(speedups)
    # drift cancels: (measured / predicted) / (dense now / base) == 1 / that ratio
    e = struct["targets"]["1.2"]["spdy"]
    assert e["measured_over_predicted_seconds"] / e["dense_over_base"] == pytest.approx(
        1 / e["measured_over_modelled_speedup"]
    )
    assert results["unstructured_cpu_check"]["masked_seconds"] > 0
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert (
        on_disk["families"]["unstructured_flops"]["targets"]["2"]["spdy"]["choice"]
        == (unstr["targets"]["2"]["spdy"]["choice"])
    )
    assert (tmp_path / "profiles.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "unstructured_flops" in format_table(results)
    # restoring the checkpoint gives the same dense model without training
    config = _tiny().replace(checkpoint=str(tmp_path / "checkpoint"))
    train_ds, test_ds = load_datasets(config)
    restored, history = _train_or_restore(config, train_ds, None)
    assert history == []
    acc = jtrain.evaluate(restored, test_ds)["accuracy"]
    assert acc == pytest.approx(results["dense_accuracy"], abs=0.01)


def test_functional_forward_matches_flax_model_and_units_slice_exactly():
    strides, pool = (1, 2, 1, 1, 2), (False, False, True, False, False)
    model = SmallCNN(1, 10, (8, 16, 12, 6, 10), strides=strides, pool_after=pool,
                     rngs=nnx.Rngs(0))  # fmt: skip
    model.eval()
    params, stats = fmodel.split(model)
    stats = jax.tree.map(lambda a: a + 0.1 * jnp.abs(a) + 0.05, stats)  # non-trivial statistics
    state = nnx.state(model, nnx.BatchStat)
    nnx.replace_by_pure_dict(state, stats)
    nnx.update(model, state)
    arch = fmodel.Arch.of(model)
    assert arch == fmodel.Arch(strides, pool)
    x = jax.random.normal(jax.random.key(1), (5, 12, 12, 1))
    logits, taps = fmodel.forward(arch, params, stats, x)
    np.testing.assert_allclose(logits, model(x), rtol=1e-5, atol=1e-5)
    assert set(taps) == set(arch.names())
    # 5 blocks: units 4 -> head, 2 -> 3, 0 -> 1; no block is both producer and consumer
    units = fmodel.units(arch)
    assert [(u.producer, u.consumer) for u in units] == [
        (0, "blocks/1/conv/kernel"),
        (2, "blocks/3/conv/kernel"),
        (4, "head/kernel"),
    ]
    # masking each consumer's input channels == physically removing the producer's channels
    pruned = jax.tree.map(np.array, params)
    for u, s in zip(units, (0.5, 0.7, 0.3), strict=True):
        node = (
            pruned["head"] if u.consumer_block is None else pruned["blocks"][u.producer + 1]["conv"]
        )
        k = node["kernel"]
        node["kernel"] = np.where(input_channel_mask(k, s, scale=np.ones(k.shape[-2])), k, 0)
    masked, _ = fmodel.forward(arch, pruned, stats, x)
    sp, ss = fmodel.slice_units(arch, pruned, stats)
    assert sp["blocks"][0]["conv"]["kernel"].shape == (3, 3, 1, 4)
    assert sp["blocks"][1]["conv"]["kernel"].shape == (3, 3, 4, 16)
    assert sp["blocks"][2]["conv"]["kernel"].shape == (3, 3, 16, 4)
    assert sp["blocks"][4]["bn"]["scale"].shape == (7,) and sp["head"]["kernel"].shape == (7, 10)
    sliced, _ = fmodel.forward(arch, sp, ss, x)
    np.testing.assert_allclose(sliced, masked, rtol=1e-5, atol=1e-5)
    # a unit's timed computation is the model's own: producer block + consumer conv / head
    for u in units:
        width = params["blocks"][u.producer]["conv"]["kernel"].shape[-1]
        args = fmodel.unit_args(params, stats, u, taps[f"blocks/{u.producer}/conv/kernel"], width)
        y = fmodel.unit_fn(arch, u)(*args)
        nxt = taps[u.consumer]
        kernel = fmodel._leaf(params, u.consumer)
        want = fmodel.layer_fns(arch)[u.consumer](kernel, nxt)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_input_channel_mask():
    w = np.zeros((3, 3, 4, 2), np.float32)
    w[:, :, 0] = 1.0
    w[:, :, 1] = 2.0
    w[:, :, 2] = 3.0
    w[:, :, 3] = 0.5
    m = input_channel_mask(w, 0.5)
    assert m.shape == w.shape and m.dtype == bool
    np.testing.assert_array_equal(m.any(axis=(0, 1, 3)), [False, True, True, False])
    # the activation scale changes the ranking: channel 3 carries large inputs
    m = input_channel_mask(w, 0.5, scale=np.array([1.0, 1.0, 1.0, 100.0]))
    np.testing.assert_array_equal(m.any(axis=(0, 1, 3)), [False, False, True, True])
    # cumulative: only channels alive in prev_mask compete
    prev = np.broadcast_to(np.array([True, True, False, False])[:, None], w.shape)
    m = input_channel_mask(w, 0.75, prev)
    np.testing.assert_array_equal(m.any(axis=(0, 1, 3)), [False, True, False, False])
    dense = input_channel_mask(np.ones((5, 3)), 0.0)
    assert dense.all()
    # aligned counts: 0.75 of 16 keeps 4, rounded up to 8; the 8 largest channels survive
    w16 = np.broadcast_to(np.arange(1.0, 17.0)[:, None], (16, 3))
    m = input_channel_mask(w16, 0.75, multiple=8)
    np.testing.assert_array_equal(m.any(axis=1), np.arange(16) >= 8)
    with pytest.raises(ValueError, match="sparsity"):
        input_channel_mask(w, 1.0)
    with pytest.raises(ValueError, match="scale"):
        input_channel_mask(w, 0.5, scale=np.ones(3))


def test_sparse_runtime_curve(tmp_path, monkeypatch):
    lv = levels(default.get_config())
    rel = sparse_runtime_curve(lv)
    assert rel[0] == 1.0 and rel.shape == (len(lv),)
    assert rel[1] == pytest.approx(1.3429, abs=1e-4)  # DeepSparse: 40% sparse is slower
    assert rel[-1] == pytest.approx(0.2342, abs=1e-4) and np.all(np.diff(rel[1:]) < 0)
    assert np.all(rel[1:] > 1.0 - np.asarray(lv[1:]))  # never the FLOPs ideal
    with pytest.raises(ValueError, match="not covered"):
        sparse_runtime_curve((0.0, 0.995))
    monkeypatch.delenv("JAXCOMPRESS_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="rn50_unstr.txt"):
        sparse_runtime_curve(lv, str(tmp_path))


def test_configs_and_levels():
    assert default.get_config().validate().dataset == "fashion_mnist"
    q = quick.get_config().validate()
    lv = levels(q)
    assert lv[0] == 0.0 and len(lv) == q.num_levels + 1
    assert lv[1] == pytest.approx(q.min_sparsity) and lv[-1] == pytest.approx(q.max_sparsity)
    assert all(a < b for a, b in zip(lv, lv[1:], strict=False))
    with pytest.raises(ValueError, match="speedups"):
        Config(speedups=(1.0,)).validate()
    with pytest.raises(ValueError, match="strides"):
        Config(strides=(1, 2)).validate()
    with pytest.raises(ValueError, match="pool_after"):
        Config(pool_after=(0,) * 7).validate()
    for fixed in ("structured_timing", "timing_clock", "channel_multiple", "min_sparsity"):
        # fixed settings of the experiment: readable, not configurable
        assert fixed in Config().fixed()
        with pytest.raises(TypeError, match=f"has no field '{fixed}'"):
            Config().replace(**{fixed: Config().fixed()[fixed]})
    for bad in ((2.0, float("inf")), (float("nan"),), (1.0,), (2.0, 2.0)):
        with pytest.raises(ValueError, match="speedups"):
            Config(speedups=bad).validate()
    with pytest.raises(ValueError, match="checkpoint: '/nonexistent/ckpt' is not a directory"):
        Config(checkpoint="/nonexistent/ckpt").validate()
    for bad in ((), ("structured_measured",) * 2, ("dense",), ["unstructured_flops"]):
        with pytest.raises(ValueError, match="families must be a non-empty tuple"):
            Config(families=bad).validate()
    with pytest.raises(ValueError, match="search_gap_epochs must be a non-negative int"):
        Config(search_gap_epochs=-1).validate()
    assert Config(families=("structured_measured",), search_gap_epochs=2).validate()
    d = default.get_config()
    assert len(d.widths) == len(d.strides) == len(d.pool_after) == 7  # odd: every block in a unit


def test_cli_widths_and_families(capsys):
    from experiments.spdy import main as cli

    args = cli.build_parser().parse_args(
        ["--widths", "8,8,16,16,32,32,64", "--families", "unstructured_flops", "--out", "x"]
    )
    assert args.widths == (8, 8, 16, 16, 32, 32, 64) and args.families == ("unstructured_flops",)
    for argv, match in (
        (["--families", "dense"], "--families: expected comma-separated items, each one of"),
        (["--families", "unstructured_flops,unstructured_flops"], "families must be"),
        (["--widths", "8,x"], "--widths: expected comma-separated items, each an integer"),
        (["--widths", "8,0"], "widths must be a non-empty tuple of positive ints"),
        (["--widths", "8,8"], "strides must be a tuple of 2"),  # the config's own check
    ):
        with pytest.raises(SystemExit) as exc:
            cli.main([*argv, "--out", "x"])
        assert exc.value.code == 2
        assert match in capsys.readouterr().err


def test_timing_clock_and_images():
    from experiments.spdy.train import timing_clock, timing_images

    assert jax.default_backend() == "cpu"
    assert timing_clock(Config()) == "cpu"  # auto: process CPU time on the CPU backend
    x = np.arange(5 * 2).reshape(5, 2)
    np.testing.assert_array_equal(timing_images(x, 3), x[:3])
    tiled = timing_images(x, 12)  # more rows than images: cycled, not silently capped
    assert tiled.shape == (12, 2)
    np.testing.assert_array_equal(tiled[5:10], x)
    np.testing.assert_array_equal(tiled[10:], x[:2])


def test_cli_flags(capsys):
    from experiments.spdy import main as cli

    args = cli.build_parser().parse_args(["--timing-batch", "8192", "--speedups", "1.2,1.4"])
    assert args.timing_batch == 8192 and args.speedups == (1.2, 1.4)
    for argv, match in (
        (["--timing-batch", "0"], "timing_batch must be a positive int, got 0"),
        (["--timing-clock", "wall"], "unrecognized arguments: --timing-clock"),  # fixed: auto
        (["--speedups", "1.0"], "speedups must be"),
        (["--speedups", "2,2"], "speedups must be"),
        (["--speedups", "inf"], "speedups must be"),
        (["--speedups", "x"], "--speedups: expected comma-separated items, each a number"),
        (["--checkpoint", "/nonexistent/ckpt"], "not a directory"),
    ):
        with pytest.raises(SystemExit) as exc:
            cli.main([*argv, "--out", "x"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1, err


def test_kept_channels():
    from experiments.spdy.train import kept_channels

    assert [kept_channels(16, s) for s in (0.0, 0.4, 0.75, 0.99)] == [16, 10, 4, 1]
    assert [kept_channels(16, s, 8) for s in (0.0, 0.4, 0.75, 0.99)] == [16, 16, 8, 8]
    assert kept_channels(12, 0.1, 8) == 12  # never more than the layer has
