"""The latency-surrogate experiment: config and flags, its helpers, resume or refusal of an
existing --out, and a tiny end-to-end run per task (slow) with the results.json schema."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

# ``experiments`` is a top-level folder of the repository, not part of the installed package.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import jaxcompress as jc  # noqa: E402
import jaxcompress.latency as L  # noqa: E402
from experiments._common import open_run  # noqa: E402
from experiments.surrogate import main as cli  # noqa: E402
from experiments.surrogate import report  # noqa: E402
from experiments.surrogate._study import hold_above, restrict, rms_gates  # noqa: E402
from experiments.surrogate.configs import default, quick  # noqa: E402
from experiments.surrogate.configs.base import TASK_DEFAULTS, TASKS, Config  # noqa: E402
from experiments.surrogate.tasks import head_groups, svd_ranks  # noqa: E402
from experiments.surrogate.train import _aggregate, run  # noqa: E402
from jaxcompress.models import MLP, SmallCNN  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"

# --------------------------------------------------------------------------------------------
# Config and flags
# --------------------------------------------------------------------------------------------


def test_configs_validate_and_stay_small():
    assert len(dataclasses.fields(Config)) <= 25
    for config in (default.get_config(), quick.get_config()):
        assert config.validate() is config
        assert config.tasks == TASKS
    c = quick.get_config()
    assert c.task("cnn").targets == (0.5, 0.25) and c.task("cnn").lam0 == 0.1
    assert c.task("cnn").gain == TASK_DEFAULTS["cnn"]["gain"]  # None: the task's
    assert default.get_config().task("mlp").dataset == "mnist"
    assert Config(dataset="digits").task("mlp").dataset == "digits"
    assert Config(dataset="digits").task("sst2").dataset == "sst2"
    assert Config().task("sst2").multipliers == (1.0,)
    assert Config(multipliers=(1.0, 0.5)).task("sst2").multipliers == (0.5, 1.0)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"tasks": ("cnn", "resnet")}, "tasks"),
        ({"tasks": ()}, "tasks"),
        ({"dataset": "cifar10"}, "dataset"),
        ({"targets": (0.5, 1.5)}, "targets"),
        ({"targets": (0.5, 0.5)}, "targets must be distinct"),
        ({"multipliers": (0.5,)}, "multipliers must contain 1.0"),
        ({"epochs": 2, "finetune_epochs": 2}, "finetune_epochs must be < epochs"),
        ({"epochs": 0}, "epochs"),
        ({"tau": 1.0}, "tau"),
        ({"width": 0.0}, "width"),
        ({"gain": -1.0}, "gain"),
        ({"lam0": 1e4}, "lam0"),
        ({"num_seeds": 0}, "num_seeds"),
        ({"normalize": 1}, "normalize"),
        ({"l1": "yes"}, "l1"),
    ],
)
def test_config_rejects_bad_values(changes, match):
    with pytest.raises((TypeError, ValueError), match=match):
        Config().replace(**changes).validate()


def test_replace_rejects_unknown_fields():
    with pytest.raises(TypeError, match="cnn_targets"):
        Config().replace(cnn_targets=(0.5,))


def test_cli_parses_flags():
    args = cli.build_parser().parse_args(
        ["--quick", "--tasks", "cnn,mlp", "--seeds", "2", "--targets", "0.5,0.3", "--out", "x",
         "--dataset", "mnist", "--no-normalize", "--lam0", "none", "--no-l1"]
    )  # fmt: skip
    assert args.tasks == ("cnn", "mlp") and args.num_seeds == 2 and args.targets == (0.5, 0.3)
    assert args.dataset == "mnist" and args.normalize is False and args.lam0 is None
    assert args.l1 is False
    assert args.quick and args.out == "x"
    assert not hasattr(cli.build_parser().parse_args([]), "normalize")  # the config decides


def test_existing_out_of_another_config_is_refused(tmp_path, capsys):
    open_run(quick.get_config().replace(tasks=("cnn",)), tmp_path)
    with pytest.raises(ValueError, match="tasks"):
        run(quick.get_config().replace(tasks=("mlp",)), tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(["--quick", "--tasks", "mlp", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "another config" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _pt(key, flops, accuracy, **extra):
    return {"key": key, "flops": flops, "accuracy": accuracy, **extra}


def test_pareto_helpers():
    pts = [_pt("a", 100, 0.80), _pt("b", 200, 0.85), _pt("c", 300, 0.84), _pt("d", 400, 0.90)]
    assert [p["key"] for p in report.pareto_front(pts)] == ["a", "b", "d"]
    assert report.best_within(pts, 0.845)["key"] == "b"
    assert report.best_within(pts, 0.95) is None
    assert report.uniform_flops_at(0.80, pts) == 100.0
    assert report.uniform_flops_at(0.95, pts) is None
    assert 200.0 < report.uniform_flops_at(0.875, pts) < 400.0
    assert report.accuracy_at(50, pts) is None
    assert report.accuracy_at(500, pts) == 0.90
    assert report.accuracy_at(200, pts) == pytest.approx(0.85)


def _record(surrogate_flops=400, landing=(-0.01, 0.03)):
    ref = _pt("uniform_1", 1000, 0.90, method="uniform", multiplier=1.0, latency_ms=2.0)
    uni = [
        _pt("uniform_0.5", 300, 0.85, method="uniform", multiplier=0.5, latency_ms=1.0),
        _pt("uniform_0.75", 560, 0.896, method="uniform", multiplier=0.75, latency_ms=1.4),
        ref,
    ]

    def comp(method, target, flops, acc, err):
        return _pt(f"{method}_{target:g}", flops, acc, method=method, target=target,
                   landing_error=err, latency_ms=flops / 500)  # fmt: skip

    return {
        "reference": ref,
        "uniform": uni,
        "surrogate": [comp("surrogate", 0.5, surrogate_flops, 0.898, landing[0])],
        "l1": [comp("l1", 0.5, 480, 0.893, landing[1])],
    }


def test_summary_of_a_gated_study():
    s = report.summarize("resnet20", _record())
    assert s["surrogate_best"]["key"] == "surrogate_0.5"
    assert s["uniform_best"]["key"] == "uniform_0.75"  # 0.896 >= 0.90 - 0.005
    assert s["flops_advantage_over_best_uniform"] == pytest.approx(560 / 400)
    assert s["met_flops_advantage"] and s["controller"]["met"]
    assert s["controller"]["worst"] == 0.03
    assert s["surrogate_minus_l1_at_equal_flops"] == [None]  # cheaper than every l1 model
    missed = report.summarize("resnet20", _record(surrogate_flops=500, landing=(-0.08, 0.0)))
    assert not missed["met_flops_advantage"] and not missed["controller"]["met"]
    assert s["uniform_over_surrogate_flops_at_equal_accuracy"]["surrogate_0.5"] > 1.0
    seeds = report.summarize("resnet20", _record(), [_record(), _record(landing=(-0.06, 0.0))])
    assert seeds["controller"]["worst"] == -0.06 and not seeds["controller"]["met"]
    assert "seed1/surrogate_0.5" in seeds["controller"]["errors"]  # every run, not the mean
    cnn = report.summarize("cnn", _record())  # 0.3 points: uniform x0.75 is out
    assert cnn["uniform_best"]["key"] == "uniform_1"
    record = _record()
    for p in [record["reference"], *(q for m in ("uniform", "surrogate", "l1") for q in record[m])]:
        p.update(flops_ratio=p["flops"] / 1000, latency_ratio=p["latency_ms"] / 2.0)
    table = report.format_table({"resnet20": {**record, "summary": s, "dataset": "x"}})
    assert "1.40x fewer FLOPs" in table and "+3.0%" in table


def test_seeds_are_averaged_with_std():
    a, b = _record(), _record(surrogate_flops=420)
    b["surrogate"][0]["accuracy"] = 0.9
    mean = _aggregate([a, b])
    p = mean["surrogate"][0]
    assert p["flops"] == 410 and p["key"] == "surrogate_0.5" and p["method"] == "surrogate"
    assert p["accuracy"] == pytest.approx(0.899)
    assert p["flops_std"] == pytest.approx(np.std([400, 420], ddof=1))
    assert "accuracy_std" in mean["reference"]


def test_rms_gates_keep_the_function_and_commit_what_was_trained():
    model = SmallCNN(1, 10, (4, 6), rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 1)).astype(np.float32)
    model.eval()
    names = head_groups(jc.structure.groups(model, x[:1]))
    assert names == ["blocks/1/conv"]
    gated = L.gated(model, x[:1], init=0.1)
    wrapped = rms_gates(gated, names)
    assert rms_gates(gated, ()) is gated
    gated.gates["blocks/0/conv"][...] = np.ones(4, np.float32)
    # equal gates act as 1 once normalised: the ungated function
    np.testing.assert_allclose(wrapped(x), model(x), rtol=1e-5, atol=1e-5)
    gated.gates[names[0]][...] = np.array([0.1, 0.2, 0.0, 0.4, 0.1, 0.3], np.float32)
    out = wrapped(x)
    wrapped.commit()
    g = np.asarray(gated.gates[names[0]][...])
    assert np.sqrt(np.mean(g**2)) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(gated(x), out, rtol=1e-5, atol=1e-5)


def test_hold_above_freezes_the_gates_before_the_target():
    model = MLP(6, (5,), 3, rngs=nnx.Rngs(0))
    x = np.ones((1, 6), np.float32)
    gated = L.gated(model, x, init=0.5)
    gated.gates["layers/0"][...] = np.array([1.0, 0.5, 0.2, 0.1, 0.05], np.float32)
    cost = jc.structure.macs(model, x)
    four = cost({"layers/0": 4}) / cost.dense  # the cost once the last gate is pruned
    params = nnx.state(gated, nnx.Param)
    grads = jax.tree.map(lambda a: np.full(a.shape, 0.01, np.float32), params)
    grads["gates"]["layers/0"][...] = np.array([0, 0, 0, 0, 0.05], np.float32)  # prunes unit 4

    def step(ratio):
        tx = hold_above(optax.sgd(1.0), cost, ratio, tau=1e-2)
        return tx.update(grads, tx.init(params), params)[0]

    free = step(four - 0.01)  # the step stays above the target: applied
    np.testing.assert_allclose(free["gates"]["layers/0"][...], -grads["gates"]["layers/0"][...])
    landing = step(four * 1.01)  # it lands within HOLD_MARGIN below the target: applied
    np.testing.assert_allclose(landing["gates"]["layers/0"][...], free["gates"]["layers/0"][...])
    held = step(four + 0.05)  # it would overshoot by more: the gates hold, the weights train
    assert np.abs(np.asarray(held["gates"]["layers/0"][...])).max() == 0
    np.testing.assert_allclose(held["model"]["layers"][0]["kernel"][...], -0.01)
    done = step(1.0)  # at (or below) the target already: frozen
    assert np.abs(np.asarray(done["gates"]["layers/0"][...])).max() == 0


def test_svd_ranks_fit_the_budget():
    dense = MLP(20, (12, 8), 3, rngs=nnx.Rngs(0))
    x = np.zeros((1, 20), np.float32)
    fac = L.factorize(dense, x, select=lambda path, layer: path != ("layers", 2))
    cost = jc.structure.macs(fac, x)
    full = {n: s for n, s in cost.sizes.items() if n.endswith("/u")}
    assert sorted(full.values()) == [8, 12]
    for budget in (cost.dense, 0.5 * cost.dense, 1.0):
        kept = svd_ranks(cost, full, budget)
        assert cost(kept) <= budget or set(kept.values()) == {1}
    kept = svd_ranks(cost, full, 0.5 * cost.dense)
    ranks_only = restrict(cost, full)  # the neuron groups at full size
    assert set(ranks_only.sizes) == set(full) and ranks_only.dense == cost.dense
    assert ranks_only(kept) == cost(kept)
    bigger = {n: min(full[n], k + 1) for n, k in kept.items()}
    assert cost(bigger) > 0.5 * cost.dense  # the largest fraction that fits


# --------------------------------------------------------------------------------------------
# Tiny end-to-end runs (real data; digits for the image tasks)
# --------------------------------------------------------------------------------------------


def _tiny(task: str) -> Config:
    return quick.get_config().replace(
        tasks=(task,),
        dataset="digits",
        epochs=2,
        finetune_epochs=1,
        train_subset=640 if task == "sst2" else None,
        test_subset=200,
        width=0.25,
        targets=(0.5,),
        multipliers=(0.5, 1.0) if task in ("cnn", "resnet20") else None,
        batch_size=64,
        gain=20.0,
        latency_repeats=2,
        progress=False,
    )


_POINT = {"key", "method", "flops", "accuracy", "latency_ms", "flops_ratio", "latency_ratio"}
_COMPRESSED = _POINT | {"target", "landing_error", "kept", "sizes", "gated_accuracy",
                        "accuracy_before_finetune", "lambda_final", "gate_stats"}  # fmt: skip


@pytest.mark.slow  # 1-3 minutes of CPU per task (tracing, training, timing)
@pytest.mark.parametrize("task", TASKS)
def test_tiny_run_per_task(task, tmp_path):
    config = _tiny(task)
    results = run(config, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    assert (tmp_path / f"pareto_{task}.png").read_bytes()[:8] == PNG
    assert (tmp_path / "stages" / f"{task}_seed0.json").is_file()
    res = results[task]
    assert set(res) >= {"reference", "summary", "per_seed", "seconds", "dataset"}
    assert set(res["reference"]) >= _POINT
    compressed = res["surrogate"] + res.get("l1", [])
    assert compressed and all(set(p) >= _COMPRESSED for p in compressed)
    ref_flops = res["reference"]["flops"]
    for p in compressed:
        budget = p["target"] * ref_flops
        assert p["flops"] <= budget  # within_budget: never above the target
        assert p["landing_error"] == pytest.approx(p["flops"] / budget - 1)
        assert all(0 < p["kept"][n] <= p["sizes"][n] for n in p["kept"])
        assert p["latency_ms"] > 0
    if task in ("cnn", "resnet20"):
        assert [p["multiplier"] for p in res["uniform"]] == [0.5, 1.0]
        assert res["uniform"][0]["flops"] < ref_flops
    if task == "mlp":
        assert res["svd"][0]["flops"] <= res["surrogate"][0]["flops"]
    assert set(results) >= {"units", "config", "dataset_sizes", "timing", "environment"}
    # a finished run is read back, not rerun; a finished stage too; another config is refused
    assert run(config, tmp_path) == json.loads(json.dumps(results))
    os.remove(tmp_path / "results.json")
    again = run(config, tmp_path)
    assert again[task]["per_seed"] == json.loads(json.dumps(res["per_seed"]))
    assert again[task]["seconds"] == json.loads(json.dumps(res["seconds"]))  # no training
    with pytest.raises(ValueError, match="another config"):
        run(config.replace(tau=0.02), tmp_path)


# --------------------------------------------------------------------------------------------
# Bit-level gates: python -m experiments.surrogate.bits
# --------------------------------------------------------------------------------------------


def test_bits_study_rejects_bad_flags(tmp_path, capsys):
    from experiments.surrogate import bits

    afile = tmp_path / "file"
    afile.write_text("x")
    for argv, match in (
        (["--target", "1.5"], "--target must be in"),
        (["--levels", "1"], "--levels must be in"),
        (["--out", str(afile)], "is not a folder"),
    ):
        with pytest.raises(SystemExit):
            bits.main(argv)
        assert match in capsys.readouterr().err
    assert afile.read_text() == "x"


@pytest.mark.slow  # about a minute of CPU: six tiny trainings on MNIST
def test_bits_study_tiny_run(tmp_path):
    from experiments.surrogate import bits

    out = tmp_path / "bits"
    argv = ["--levels", "3", "--epochs", "1", "--train-subset", "256", "--out", str(out)]
    result = bits.main(argv)
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"].keys() == result["rows"].keys()
    assert set(saved["rows"]) == {"float", "surrogate", "uniform_1", "uniform_2", "uniform_3"}
    for b in (1, 2, 3):
        row = saved["rows"][f"uniform_{b}"]
        assert row["ratio"] == pytest.approx(b / 3)
        assert set(row["bits"].values()) == {b} and len(row["bits"]) == 3  # three kernels
    surrogate = saved["rows"]["surrogate"]
    assert set(surrogate["bits"].values()) <= {1, 2, 3}
    assert 0 < surrogate["ratio"] <= 1
    for row in saved["rows"].values():
        assert 0.0 <= row["accuracy"] <= 1.0
