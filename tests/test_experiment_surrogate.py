"""The latency-surrogate experiment runs end to end on a tiny real setting and keeps its schema."""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

# ``experiments`` is a top-level folder of the repository, not part of the installed package.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import jaxcompress.latency as L  # noqa: E402
from experiments.surrogate import main as cli  # noqa: E402
from experiments.surrogate.configs import default, quick  # noqa: E402
from experiments.surrogate.configs.base import Config  # noqa: E402
from experiments.surrogate.train import (  # noqa: E402
    _aggregate,
    _cnn_summary,
    accuracy_at,
    best_within,
    format_table,
    lowrank_from_dense,
    pareto_front,
    run,
    svd_ranks_for_budget,
    truncated_svd_model,
    uniform_flops_at,
)
from jaxcompress.models import MLP  # noqa: E402
from jaxcompress.spdy import TimingTable  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _tiny() -> Config:
    # digits (1438 x 8x8) for both image tasks: 22 steps per epoch at batch 64 (SST-2: 20); a
    # strong controller gain so that two penalty epochs (44 steps) prune.
    return quick.get_config().replace(
        cnn_lam0=0.1,
        l1_lam0=0.01,
        latency_batch_size=8,
        latency_repeats=2,
        latency_rounds=1,
        cnn_dataset="digits",
        cnn_widths=(8, 16, 16, 16),
        cnn_epochs=3,
        cnn_finetune_epochs=1,
        cnn_batch_size=64,
        cnn_learning_rate=1e-2,
        cnn_targets=(0.4,),
        cnn_gain=0.3,
        cnn_channel_multiple=2,
        cnn_rounding="budget",
        cnn_budget_criterion="loss",
        cnn_multipliers=(0.5, 1.0),
        cnn_latency_targets=(0.5,),
        cnn_latency_grid=(0.5, 1.0),
        cnn_latency_batch=8,
        cnn_train_subset=None,
        cnn_test_subset=None,
        sst2_d_model=16,
        sst2_num_heads=2,
        sst2_num_layers=1,
        sst2_mlp_dim=32,
        sst2_max_len=16,
        sst2_epochs=2,
        sst2_finetune_epochs=0,  # no fine-tuning: the extracted model is evaluated as is
        sst2_batch_size=64,
        sst2_learning_rate=1e-2,
        sst2_targets=(0.4,),
        sst2_gain=0.3,
        sst2_train_subset=1280,
        sst2_warmup_steps=0,
        mlp_dataset="digits",
        mlp_hidden=(32, 16),
        mlp_epochs=2,
        mlp_penalty_epochs=2,
        mlp_finetune_epochs=0,  # SVD still fine-tunes for the 2 penalty epochs
        mlp_batch_size=64,
        mlp_learning_rate=1e-2,
        mlp_targets=(0.4,),
        mlp_gain=0.3,
        mlp_train_subset=None,
        mlp_test_subset=None,
        progress=False,
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("surrogate")
    return run(_tiny(), out), out


def _check_point(p, dense_flops):
    assert isinstance(p["flops"], int) and 0 < p["flops"]
    assert 0.0 <= p["accuracy"] <= 1.0
    assert p["latency_ms"] > 0
    assert p["flops_ratio"] == pytest.approx(p["flops"] / dense_flops)


@pytest.mark.slow  # the tiny end-to-end run (~80 s of CPU); #23 rebuilds this experiment
def test_run_writes_schema_and_files(tiny_run):
    results, out = tiny_run
    assert {"cnn", "sst2", "mlp", "units", "config", "timing", "environment"} <= set(results)
    for task, methods in (("cnn", ("uniform", "surrogate", "l1", "surrogate_latency")),
                          ("sst2", ("surrogate",)),
                          ("mlp", ("surrogate", "svd"))):  # fmt: skip
        res = results[task]
        ref = res["reference"]
        assert ref["flops_ratio"] == 1.0 and ref["latency_ratio"] == 1.0
        _check_point(ref, ref["flops"])
        for method in methods:
            assert len(res[method]) >= 1
            for p in res[method]:
                _check_point(p, ref["flops"])
        assert len(res["per_seed"]) == 1 and "summary" in res
        assert (out / f"pareto_{task}.png").read_bytes()[:8] == PNG
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["cnn"]["surrogate"] == results["cnn"]["surrogate"]
    assert (out / "metrics_cnn_uniform_1_seed0.jsonl").exists()
    assert (out / "metrics_cnn_surrogate_0.4_penalty_seed0.jsonl").exists()
    # the latency form: its measured table is saved and reloads into the same model
    table = TimingTable.from_json((out / "cnn_latency_table.json").read_text())
    tiny = _tiny()
    gated = L.GatedCNN(1, 10, tiny.cnn_widths, strides=tiny.cnn_strides, rngs=nnx.Rngs(0))
    graph = L.cost_graph(gated, (8, 8, 1))
    model = L.LatencyModel.from_table(graph, table).monotone()  # cnn_latency_monotone
    (point,) = results["cnn"]["surrogate_latency"]
    modelled = float(model.latency(point["widths"]) / model.dense())
    assert point["modelled_latency_ratio"] == pytest.approx(modelled, rel=1e-5)
    # cnn_latency_padding: extracted at the fastest measured widths at least as wide
    measured = L.LatencyModel.from_table(graph, table)
    before = {g: int(w) for g, w in point["widths_before_padding"].items()}  # one-seed means
    assert point["widths"] == measured.fastest_widths(before)
    grid = float(measured.latency(point["widths"]) / measured.dense())
    assert point["measured_grid_latency_ratio"] == pytest.approx(grid, rel=1e-5)
    assert grid <= point["measured_grid_latency_ratio_before_padding"] * (1 + 1e-6)
    assert 0.0 < modelled < 1.0 and point["flops"] < results["cnn"]["reference"]["flops"]
    (row,) = results["cnn"]["summary"]["latency_form"]
    assert row["target"] == 0.5 and row["latency_ratio"] == point["latency_ratio"]
    table = format_table(results)
    for word in ("[cnn]", "[sst2]", "[mlp]", "uniform", "l1", "svd", "latency form"):
        assert word in table


@pytest.mark.slow  # the tiny end-to-end run (~80 s of CPU); #23 rebuilds this experiment
def test_compressed_points_are_smaller_and_consistent(tiny_run):
    results, _ = tiny_run
    cnn = results["cnn"]
    dense = cnn["reference"]["flops"]
    assert [p["multiplier"] for p in cnn["uniform"]] == [0.5, 1.0]
    assert cnn["uniform"][0]["flops"] < dense
    for method in ("surrogate", "l1"):
        p = cnn[method][0]
        assert p["flops"] < dense  # the controller pruned
        widths = [p["widths"][f"blocks/{i}/gate/alpha"] for i in range(4)]
        assert all(1 <= w <= full for w, full in zip(widths, (8, 16, 16, 16), strict=True))
        assert all(w % 2 == 0 for w in widths)  # cnn_channel_multiple=2
        # cnn_rounding="budget": rounded within the target, whatever the exact counts cost
        assert p["flops"] <= p["target"] * dense
        active = p["active_flops_ratio_per_epoch"]  # exact counts, one per penalty epoch
        assert len(active) == 2 and all(0 < a <= 1 for a in active)
        assert p["lambda_final"] > 0
        stats = p["gate_stats"]  # gate_diagnostics of the gated model before extraction
        assert set(stats) == set(p["widths"])
        for name, g in stats.items():
            assert 0 <= g["kept"] <= g["size"] and 0 <= g["uniformity"] <= 1 + 1e-9
            assert (g["kept"] == 0) == (g["uniformity"] == 0)  # 0: a group pruned to nothing
            assert p["widths"][name] <= max(-(-g["kept"] // 2) * 2, 2)  # kept, rounded up
    sst = results["sst2"]
    assert sst["surrogate"][0]["flops"] < sst["reference"]["flops"]
    # sst2_finetune_epochs=0: the extracted model is evaluated as extracted
    assert sst["surrogate"][0]["accuracy"] == sst["surrogate"][0]["accuracy_before_finetune"]
    mlp = results["mlp"]
    for s, v in zip(mlp["surrogate"], mlp["svd"], strict=True):
        assert s["flops"] < mlp["reference"]["flops"]
        assert v["flops"] <= s["flops"]  # SVD at equal (not larger) FLOPs
        assert v["hidden"] == [32, 16]
        assert s["hidden"][0] <= 32 and s["ranks"][0] <= 32
    summary = cnn["summary"]
    assert summary["dominated_budgets"] in (0, 1)
    assert len(summary["latency"]) == 2
    assert 0.0 <= results["sst2"]["summary"]["flops_reduction"] < 1.0


def test_lowrank_from_dense_is_the_same_function_and_svd_truncation():
    dense = MLP(12, (8, 6), 3, rngs=nnx.Rngs(0))
    x = np.asarray(jax.random.normal(jax.random.key(1), (5, 12)))
    gated = lowrank_from_dense(dense, gate_init=0.1)
    assert all(np.allclose(v, 0.1) for v in L.gate_values(gated).values())
    np.testing.assert_allclose(gated(x), dense(x), rtol=1e-4, atol=1e-5)
    full = truncated_svd_model(dense, (8, 6))
    np.testing.assert_allclose(full(x), dense(x), rtol=1e-4, atol=1e-5)
    # uniform truncation: the largest common rank fraction within the budget
    ranks = svd_ranks_for_budget(784, (300, 100), 10, 100_000)
    assert ranks == (81, 27)  # rank fraction 81/300 in both layers
    cost = (784 + 300) * 81 + (300 + 100) * 27 + 100 * 10
    assert cost <= 100_000 < (784 + 300) * 82 + (300 + 100) * 27 + 1000
    assert svd_ranks_for_budget(784, (300, 100), 10, 10) == (1, 1)


def test_pareto_helpers():
    pts = [
        {"flops": 100, "accuracy": 0.80},
        {"flops": 400, "accuracy": 0.90},
        {"flops": 200, "accuracy": 0.79},  # dominated by the first point
        {"flops": 1600, "accuracy": 0.92},
    ]
    assert [p["flops"] for p in pareto_front(pts)] == [100, 400, 1600]
    assert best_within(pts, 0.85)["flops"] == 400
    assert best_within(pts, 0.95) is None
    assert uniform_flops_at(0.85, pts) == pytest.approx(200.0)  # halfway in log FLOPs
    assert uniform_flops_at(0.70, pts) == 100.0
    assert uniform_flops_at(0.93, pts) is None
    assert accuracy_at(200, pts) == pytest.approx(0.85)
    assert accuracy_at(50, pts) is None
    assert accuracy_at(5000, pts) == 0.92


def test_dominance_below_l1s_cheapest_model_needs_its_accuracy():
    def pt(key, flops, acc, **extra):
        return {"key": key, "flops": flops, "accuracy": acc, "latency_ms": flops / 1000, **extra}

    ref = pt("uniform_1", 1000, 0.92, multiplier=1.0)
    res = {
        "reference": ref,
        "uniform": [pt("uniform_0.5", 300, 0.88, multiplier=0.5), ref],
        "l1": [pt("l1_0.5", 500, 0.91, target=0.5), pt("l1_0.2", 200, 0.90, target=0.2)],
        # 0.5: above l1's curve; 0.2: cheaper than every l1 model but less accurate than the
        # cheapest one, which is not dominance
        "surrogate": [pt("s_0.5", 400, 0.915, target=0.5), pt("s_0.2", 150, 0.85, target=0.2)],
    }
    summary = _cnn_summary(res)
    assert [d["dominates"] for d in summary["dominance"]] == [True, False]
    assert summary["dominance"][1]["l1_accuracy_at_surrogate_flops"] is None
    res["surrogate"][1] = pt("s_0.2", 150, 0.905, target=0.2)  # cheaper and as accurate
    assert [d["dominates"] for d in _cnn_summary(res)["dominance"]] == [True, True]


def test_seeds_are_averaged_with_std():
    def record(acc, flops, lat):
        point = {"key": "surrogate_0.5", "target": 0.5, "flops": flops, "accuracy": acc,
                 "latency_ms": lat, "widths": {"g": flops // 10}}  # fmt: skip
        ref = {"key": "uniform_1", "multiplier": 1.0, "flops": 100, "accuracy": 0.9,
               "latency_ms": 2.0}  # fmt: skip
        return {"reference": ref, "surrogate": [point]}

    mean = _aggregate([record(0.80, 40, 1.0), record(0.90, 51, 3.0)])
    p = mean["surrogate"][0]
    assert p["key"] == "surrogate_0.5" and p["target"] == 0.5
    assert p["flops"] == 46 and isinstance(p["flops"], int)  # round(45.5) to even
    assert p["accuracy"] == pytest.approx(0.85) and p["latency_ms"] == pytest.approx(2.0)
    assert p["accuracy_std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert p["widths"] == {"g": 4.5}
    assert mean["reference"]["flops_std"] == 0.0


def test_configs_validate():
    assert default.get_config().validate().cnn_dataset == "fashion_mnist"
    assert quick.get_config().validate().cnn_train_subset is not None
    bad = [
        ({"tasks": ("cnn", "imagenet")}, ValueError, "tasks"),
        ({"cnn_targets": (0.5, 1.0)}, ValueError, "cnn_targets"),
        ({"cnn_targets": (0.5, 0.5)}, ValueError, "distinct"),
        ({"cnn_multipliers": (0.5, 0.75)}, ValueError, "1.0"),
        ({"cnn_finetune_epochs": 8}, ValueError, "cnn_finetune_epochs"),
        ({"cnn_strides": (2, 2)}, ValueError, "cnn_strides"),
        ({"sst2_d_model": 66}, ValueError, "sst2_d_model"),
        ({"tau": 1.0}, ValueError, "tau"),
        ({"cnn_gain": 0.0}, ValueError, "cnn_gain"),
        ({"cnn_lam0": 1e4}, ValueError, "cnn_lam0"),
        ({"cnn_channel_multiple": 0}, ValueError, "cnn_channel_multiple"),
        ({"cnn_rounding": "nearest"}, ValueError, "cnn_rounding must be one of"),
        ({"cnn_budget_criterion": "mass"}, ValueError, "cnn_budget_criterion must be one of"),
        ({"scale": "l2"}, ValueError, "scale must be"),
        ({"cnn_latency_targets": (0.5, 1.2)}, ValueError, "cnn_latency_targets"),
        ({"cnn_latency_grid": (0.25, 0.5)}, ValueError, "cnn_latency_grid must contain 1.0"),
        ({"cnn_latency_batch": 0}, ValueError, "cnn_latency_batch"),
        ({"cnn_latency_monotone": 1}, TypeError, "cnn_latency_monotone"),
        ({"cnn_latency_padding": "yes"}, TypeError, "cnn_latency_padding must be a bool"),
        ({"cnn_normalize_last_gates": True}, ValueError, "cnn_normalize_last_gates must be"),
        ({"mlp_dataset": "cifar10"}, ValueError, "mlp_dataset"),
        ({"num_seeds": 0}, ValueError, "num_seeds"),
        ({"progress": "yes"}, TypeError, "progress"),
    ]
    for changes, error, match in bad:
        with pytest.raises(error, match=match):
            Config(**changes).validate()
    with pytest.raises(TypeError, match="config"):
        run({"tasks": ("cnn",)})


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--tasks", "cnn,resnet"], "comma-separated tasks"),
        (["--cnn-dataset", "cifar10"], "invalid choice"),
        (["--seeds", "0"], "positive integer"),
        (["--cnn-epochs", "-1"], "positive integer"),
        (["--cnn-targets", "0.5,1.5"], "FLOPs fractions"),
        (["--cnn-channel-multiple", "0"], "positive integer"),
        (["--cnn-rounding", "down"], "invalid choice"),
        (["--scale", "max"], "invalid choice"),
        (["--cnn-normalize-last", "l1"], "invalid choice"),
        (["--cnn-epochs", "2"], "cnn_finetune_epochs"),
        (["--data-dir", "/nonexistent/dir"], "not a directory"),
    ],
)
def test_cli_rejects_bad_flags(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def test_cli_parses_flags():
    args = cli.build_parser().parse_args(
        ["--quick", "--tasks", "cnn,mlp", "--seeds", "2", "--cnn-targets", "0.5,0.3", "--out", "x",
         "--cnn-channel-multiple", "8", "--cnn-rounding", "budget", "--cnn-budget-criterion",
         "loss", "--scale", "rms", "--cnn-normalize-last", "none", "--no-cnn-latency-padding"]
    )  # fmt: skip
    assert args.tasks == ("cnn", "mlp") and args.seeds == 2 and args.cnn_targets == (0.5, 0.3)
    assert args.cnn_channel_multiple == 8 and args.cnn_rounding == "budget"
    assert args.cnn_budget_criterion == "loss" and args.scale == "rms"
    assert args.cnn_normalize_last_gates == "none" and args.cnn_latency_padding is False
    assert cli.build_parser().parse_args([]).cnn_latency_padding is None  # the config decides
    assert default.get_config().cnn_latency_padding is True
    assert args.quick and args.out == "x" and not args.no_progress


def test_normalized_last_gates_per_method():
    from experiments.surrogate.train import normalizes_last_gates

    assert default.get_config().cnn_normalize_last_gates == "surrogate"
    expect = {"surrogate": (True, False), "all": (True, True), "none": (False, False)}
    for mode, (ratio, l1) in expect.items():
        config = Config(cnn_normalize_last_gates=mode)
        assert normalizes_last_gates(config, "ratio") is ratio
        assert normalizes_last_gates(config, "l1") is l1
    with pytest.raises(ValueError, match="kind"):
        normalizes_last_gates(Config(), "hoyer")
