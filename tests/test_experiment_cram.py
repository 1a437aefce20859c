"""The CrAM experiment runs end to end on a tiny real setting and keeps its schema."""

from __future__ import annotations

import json
import os
import sys

import pytest
from _util import (
    ROOT,
    assert_killed_run_resumes,
    fit_calls,
    preempted_at,
    resume_harness,
    subprocess_env,
    tiny_config,
    without_timing,
)

from experiments.cram import main as cli
from experiments.cram.configs import default, quick
from experiments.cram.configs.base import Config
from experiments.cram.train import (
    build_model,
    format_table,
    make_transform,
    nm_selector,
    run,
)

METHODS = ("sgd", "cram", "cram_nm")


def _tiny(**changes) -> Config:
    return tiny_config(
        quick,
        **{
            "epochs": 2,
            "widths": (8, 16),
            "sparsities": (0.5, 0.9),
            "calib_batches": 4,
            "calib_batch_size": 64,
            **changes,
        },
    )


def test_run_writes_full_schema_and_plot(tmp_path):
    results = run(_tiny(), tmp_path)
    assert set(results["dense"]) == set(METHODS)
    for method in METHODS:
        assert 0.5 < results["dense"][method] <= 1.0, (method, results["dense"])
        assert set(results["oneshot"][method]) == {"0.5", "0.9"}
        assert set(results["nm"][method]) == {"2:4", "4:8"}
        for kind in ("oneshot", "nm"):
            for acc in [*results[kind][method].values(), *results["raw"][kind][method].values()]:
                assert 0.0 <= acc <= 1.0
        sparsity = results["actual_sparsity"]["oneshot"][method]
        assert sparsity["0.9"] == pytest.approx(0.9, abs=1e-3)
        assert results["actual_sparsity"]["nm"][method]["2:4"] == pytest.approx(0.5)
    # One seed: no spread reported; timings and config are recorded.
    assert "std" not in results
    assert results["config"]["seeds"] == [0] and results["config"]["rho"] == 0.1
    assert set(results["timing"]["train_seconds"]) == set(METHODS)
    assert len(results["per_seed"][0]["history"]["cram"]) == 2
    on_disk = json.loads((tmp_path / "results.json").read_text())
    for key in ("dense", "oneshot", "nm", "raw", "config", "timing"):
        assert on_disk[key] == json.loads(json.dumps(results[key]))
    assert (tmp_path / "accuracy_vs_sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "metrics_cram_nm_seed0.jsonl").read_text().splitlines()) == 2
    table = format_table(results)
    assert "CrAM+Multi" in table and "CrAM+N:M" in table and "90%" in table and "4:8" in table


def test_seeds_report_mean_and_std(tmp_path):
    config = _tiny(
        methods=("sgd",), num_seeds=2, epochs=1, sparsities=(0.7,), nm_patterns=((2, 4),)
    )
    results = run(config, None)
    assert results["config"]["seeds"] == [0, 1]
    runs = [r["dense"]["sgd"] for r in results["per_seed"]]
    assert runs[0] != runs[1]  # different initialisations and data orders
    assert results["dense"]["sgd"] == pytest.approx(sum(runs) / 2)
    assert results["std"]["dense"]["sgd"] == pytest.approx(abs(runs[0] - runs[1]) / 2**0.5)
    assert set(results["std"]["nm"]["sgd"]) == {"2:4"}
    assert set(results["std"]["raw"]["oneshot"]["sgd"]) == {"0.7"}
    assert "±" in format_table(results)
    assert not list(tmp_path.iterdir())  # out=None writes nothing


def test_nm_selector_skips_kernels_not_divisible_by_every_m():
    import jax.numpy as jnp
    from jax.tree_util import DictKey

    where = nm_selector(_tiny())  # patterns 2:4 and 4:8 -> groups of 8 must fit
    path = (DictKey("conv"), DictKey("kernel"))
    assert where(path, jnp.zeros((3, 3, 16, 4)))
    assert not where(path, jnp.zeros((3, 3, 1, 8)))  # a first conv on grey-scale input
    assert not where(path, jnp.zeros((3, 3, 12, 8)))  # 12 splits into 4s but not into 8s
    assert not where((DictKey("conv"), DictKey("bias")), jnp.zeros((16,)))


def test_resnet8_builds_and_cram_nm_skips_only_its_stem():
    import jax
    from flax import nnx

    config = _tiny(model="resnet8", widths=(8,))
    # Abstract shapes only (eager ResNet initialisation is slow on a loaded CPU).
    model = nnx.eval_shape(lambda: build_model(config, in_channels=1, num_classes=10, seed=0))
    assert model.head.kernel.shape == (32, 10)  # stages of width 8, 16, 32
    params = nnx.state(model, nnx.Param)
    tx = make_transform(config, "cram_nm", total_steps=10, seed=0)
    state = jax.eval_shape(tx.init, params)
    masked = [m for m in jax.tree.leaves(state.masks) if m is not None]
    kernels = [p for p in jax.tree.leaves(params) if p.ndim >= 2]
    assert len(masked) == len(kernels) - 1  # every conv/dense kernel but the 1-channel stem


def test_make_transform_rejects_unknown_method():
    with pytest.raises(ValueError, match="method"):
        make_transform(_tiny(), "sam", 10, 0)


def test_configs_validate():
    assert default.get_config().validate().sparsities == (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    assert default.get_config().nm_patterns == ((2, 4), (4, 8))
    assert quick.get_config().validate().epochs >= 1
    for changes, match in [
        ({"sparsities": (0.5, 1.0)}, "sparsities"),
        ({"cram_sparsities": ()}, "cram_sparsities"),
        ({"nm_patterns": ((4, 4),)}, "nm_patterns"),
        ({"methods": ("sgd", "adam")}, "methods"),
        ({"rho": -0.1}, "rho"),
        ({"num_seeds": 0}, "num_seeds"),
        ({"model": "vgg"}, "model"),
    ]:
        with pytest.raises(ValueError, match=match):
            Config(**changes).validate()
    with pytest.raises(TypeError, match="config"):
        run({"dataset": "digits"})


def test_cli_flags_override_the_chosen_config():
    args = cli.build_parser().parse_args(
        ["--quick", "--seeds", "3", "--nm-patterns", "2:4", "--train-subset", "none",
         "--no-progress", "--widths", "8,16", "--restart", "--mesh", "data=1"]
    )  # fmt: skip
    assert args.quick and args.restart and args.mesh == "data=1"
    assert args.num_seeds == 3 and args.nm_patterns == ((2, 4),) and args.widths == (8, 16)
    assert args.train_subset is None and args.progress is False
    assert not hasattr(cli.build_parser().parse_args([]), "epochs")  # the config decides


# --------------------------------------------------------------------------------------------
# Resume, meshes, processes
# --------------------------------------------------------------------------------------------

RESUME = {
    "epochs": 2,
    "widths": (4, 8),
    "train_subset": 320,  # 10 steps per epoch
    "test_subset": 200,
    "methods": ("sgd", "cram"),
    "sparsities": (0.5,),
    "nm_patterns": ((2, 4),),
    "calib_batches": 2,
    "calib_batch_size": 32,
}
_resume_config, _flags, uninterrupted = resume_harness(quick, run, RESUME)


@pytest.mark.slow  # two short runs: about 90 s on 2 loaded cores
def test_an_interrupted_run_resumes_and_a_finished_one_is_not_rerun(
    uninterrupted, tmp_path, monkeypatch
):
    from experiments.cram import train as cram_train

    reference, _ = uninterrupted
    with preempted_at("cram_seed0"), pytest.raises(KeyboardInterrupt):
        run(_resume_config(), tmp_path)  # cram trained and swept, not marked done
    assert (tmp_path / "stages" / "sgd_seed0.json").is_file()
    assert not (tmp_path / "results.json").exists()

    histories = []
    fit_stage = cram_train.fit_stage

    def spy(*args, **kwargs):
        histories.append(fit_stage(*args, **kwargs))
        return histories[-1]

    monkeypatch.setattr(cram_train, "fit_stage", spy)
    resumed = run(_resume_config(), tmp_path)
    # sgd was read back; cram's training was restored at its last step (nothing retrained)
    assert [h.resumed_from for h in histories] == [20]
    assert without_timing(resumed) == without_timing(reference)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert without_timing(on_disk) == without_timing(json.loads(json.dumps(reference)))

    # A finished run is not rerun: its results come back without any training.
    monkeypatch.setattr(cram_train, "fit_stage", None)
    assert run(_resume_config(), tmp_path) == on_disk

    # Another config is refused, naming the fields, before any work; --restart starts over.
    with pytest.raises(ValueError, match=r"rho: saved 0.1, now 0.2; .*seed: saved 0, now 1"):
        run(_resume_config(rho=0.2, seed=1), tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*_flags(rho=0.2), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    monkeypatch.setattr(cram_train, "fit_stage", fit_stage)
    other = run(_resume_config(methods=("sgd",), epochs=1), tmp_path, restart=True)
    assert set(other["dense"]) == {"sgd"}
    saved = json.loads((tmp_path / "run.json").read_text())["config"]
    assert saved["epochs"] == 1 and saved["methods"] == ["sgd"]
    assert sorted(os.listdir(tmp_path / "stages")) == ["sgd_seed0.json"]


@pytest.mark.slow  # three short runs in fresh processes: about 60 s on 2 loaded cores
def test_a_killed_run_resumes_to_bit_identical_results(uninterrupted, tmp_path):
    import subprocess

    reference, _ = uninterrupted
    # killed in the middle of CrAM's training (its step-10 checkpoint of 20 is committed)
    cmd = assert_killed_run_resumes(
        "cram", _flags(), tmp_path, "cram_seed0/10", reference, timeout=600
    )
    # the rerun of a finished run says so and trains nothing
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, timeout=600)
    assert proc.returncode == 0 and b"not rerun" in proc.stderr


def test_mesh_data_2_trains_sharded(monkeypatch):
    calls = fit_calls(monkeypatch)
    results = run(_resume_config(methods=("sgd",), epochs=1), None, mesh="data=2")
    # the batch and the state on 2 devices
    assert calls == [{"mesh": "data=2", "rule": "replicated", "devices": 2}]
    assert results["environment"]["mesh"] == "data=2"
    assert 0.2 < results["dense"]["sgd"] <= 1.0


@pytest.mark.slow  # two processes of a short run: about 60 s on 2 loaded cores
def test_two_processes_equal_one_process_on_two_devices(uninterrupted, tmp_path):
    import subprocess

    reference, _ = uninterrupted
    config = _resume_config(methods=("sgd",))
    one = run(config, None, mesh="data=2")  # one process, 2 of its 8 devices
    # one device each: a data=2 mesh over 2 processes (gloo collectives on 127.0.0.1)
    env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=1")
    cmd = [sys.executable, "-m", "experiments.cram", *_flags(methods=("sgd",))]
    cmd += ["--num-processes", "2", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, timeout=900)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert proc.stdout.decode().count("wall time") == 1  # process 0 reports, once
    two = json.loads((tmp_path / "results.json").read_text())
    assert two["environment"]["mesh"] == "data=2"
    for ref, tol in ((one, 1e-5), (reference, 1e-4)):  # 2 devices; one device
        pairs = zip(
            ref["per_seed"][0]["history"]["sgd"], two["per_seed"][0]["history"]["sgd"], strict=True
        )
        for a, b in pairs:
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=tol)
        assert two["dense"]["sgd"] == pytest.approx(ref["dense"]["sgd"], abs=0.011)
