"""The SPDY experiment runs end to end on a tiny real setting and keeps its schema; its
functional SmallCNN matches the Flax model, and channel slicing matches channel gating."""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from experiments.oneshot.train import load_datasets  # noqa: E402
from experiments.spdy import model as fmodel  # noqa: E402
from experiments.spdy.configs import default, quick  # noqa: E402
from experiments.spdy.configs.base import Config  # noqa: E402
from experiments.spdy.train import (  # noqa: E402
    FAMILIES,
    METHODS,
    _train_or_restore,
    format_table,
    levels,
    run,
)
from jaxcompress import train as jtrain  # noqa: E402
from jaxcompress.models import SmallCNN  # noqa: E402
from jaxcompress.spdy._reconstruct import channel_mask  # noqa: E402


def _tiny() -> Config:
    return quick.get_config().replace(
        dataset="digits",
        epochs=2,
        batch_size=32,
        learning_rate=0.05,
        widths=(8, 16),
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
        progress=False,
    )


def test_run_writes_schema_and_files(tmp_path):
    results = run(_tiny(), tmp_path)
    assert 0.3 < results["dense_accuracy"] <= 1.0
    assert set(results["families"]) == set(FAMILIES)
    unstr = results["families"]["unstructured_flops"]
    assert unstr["layers"] == ["blocks/0/conv/kernel", "blocks/1/conv/kernel", "head/kernel"]
    for target in ("1.2", "2"):
        entry = unstr["targets"][target]
        hist = np.asarray(entry["search"]["history"])
        assert np.all(np.diff(hist) <= 0)
        for method in METHODS:
            e = entry[method]
            assert e["modelled_speedup"] >= float(target) * (1 - 1e-9)
            assert 0.0 <= e["accuracy_layerwise"] <= 1.0 and 0.0 <= e["accuracy_gap"] <= 1.0
            assert e["measured_seconds"] > 0
        assert entry["spdy"]["calib_loss"] == pytest.approx(entry["search"]["score"])
    struct = results["families"]["structured_measured"]
    assert struct["layers"] == ["blocks/0/conv/kernel", "blocks/1/conv/kernel"]
    assert len(struct["table"]["layers"]) == 2
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


def test_functional_forward_matches_flax_model_and_slicing_matches_gating():
    model = SmallCNN(1, 10, (8, 16, 12), rngs=nnx.Rngs(0))
    model.eval()
    params, stats = fmodel.split(model)
    stats = jax.tree.map(lambda a: a + 0.1 * jnp.abs(a) + 0.05, stats)  # non-trivial statistics
    nnx.update(model, nnx.state(model))  # unchanged params
    arch = fmodel.Arch.of(model)
    x = jax.random.normal(jax.random.key(1), (5, 12, 12, 1))
    state = nnx.state(model, nnx.BatchStat)
    nnx.replace_by_pure_dict(state, stats)
    nnx.update(model, state)
    logits, taps = fmodel.forward(arch, params, stats, x)
    np.testing.assert_allclose(logits, model(x), rtol=1e-5, atol=1e-5)
    assert set(taps) == set(arch.names())
    pruned = jax.tree.map(lambda a: a, params)
    for i in range(3):
        k = np.asarray(params["blocks"][i]["conv"]["kernel"])
        pruned["blocks"][i]["conv"]["kernel"] = jnp.where(channel_mask(k, 0.5), k, 0)
    gated, _ = fmodel.forward(arch, pruned, stats, x, gated=True)
    sp, ss = fmodel.slice_channels(arch, pruned, stats)
    assert sp["blocks"][1]["conv"]["kernel"].shape == (3, 3, 4, 8)
    sliced, _ = fmodel.forward(arch, sp, ss, x)
    np.testing.assert_allclose(sliced, gated, rtol=1e-5, atol=1e-5)


def test_configs_and_levels():
    assert default.get_config().validate().dataset == "fashion_mnist"
    q = quick.get_config().validate()
    lv = levels(q)
    assert lv[0] == 0.0 and len(lv) == q.num_levels + 1
    assert lv[1] == pytest.approx(q.min_sparsity) and lv[-1] == pytest.approx(q.max_sparsity)
    assert all(a < b for a, b in zip(lv, lv[1:], strict=False))
    with pytest.raises(ValueError, match="speedups"):
        Config(speedups=(1.0,)).validate()
    with pytest.raises(ValueError, match="min_sparsity"):
        Config(min_sparsity=0.9, max_sparsity=0.5).validate()
