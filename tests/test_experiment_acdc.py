"""The AC/DC experiment runs end to end on a tiny real setting, keeps its schema and timeline."""

from __future__ import annotations

import json
import math
import os

import pytest
from _util import (
    assert_killed_run_resumes,
    fit_calls,
    preempted_at,
    resume_harness,
    tiny_config,
    without_timing,
)

from experiments.acdc import main as cli
from experiments.acdc.configs import default, quick
from experiments.acdc.configs.base import Config
from experiments.acdc.train import cosine_lr, format_table, make_timeline, run

PNG = b"\x89PNG\r\n\x1a\n"


def _tiny() -> Config:
    # 1437 digits / 64 = 22 steps per epoch; 4 epochs: dense 0-1, C 1-2, D 2-3, final C 3-4.
    return tiny_config(
        quick,
        epochs=4,
        batch_size=64,
        widths=(16, 32),
        train_subset=None,
        test_subset=None,
        sparsities=(0.8,),
        memorisation_subset=720,  # 11 steps per epoch
        memorisation_epochs=4,  # the same timeline as the main runs
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("acdc")
    return run(_tiny(), out), out


def test_run_writes_schema_and_files(tiny_run):
    results, out = tiny_run
    for key in ("dense", "acdc", "gmp", "oneshot_finetune", "memorisation", "curves"):
        assert key in results
    assert {"config", "timing", "schedule", "per_seed"} <= set(results)
    assert 0.6 < results["dense"] <= 1.0
    entry = results["acdc"]["0.8"]
    assert set(entry) >= {"sparse", "dense_half", "final_sparsity", "dense_half_sparsity"}
    for method in ("acdc", "gmp", "oneshot_finetune"):
        assert 0.0 <= results[method]["0.8"]["sparse"] <= 1.0
        assert results[method]["0.8"]["final_sparsity"] == pytest.approx(0.8, abs=2e-3)
    assert 0.0 < entry["final_mask_change"] <= 1.0
    assert results["timing"]["total_seconds"] > 0
    assert tuple(results["config"]["phase_epochs"]) == (1, 1, 1, 1)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["acdc"] == results["acdc"]
    assert (out / "accuracy_curves.png").read_bytes()[:8] == PNG
    assert (out / "memorisation.png").read_bytes()[:8] == PNG
    assert len((out / "metrics_dense_seed0.jsonl").read_text().splitlines()) == 4
    table = format_table(results)
    assert "acdc" in table and "gmp" in table and "memorisation" in table


def test_timeline_is_evaluated_at_phase_ends(tiny_run):
    """The model read at an epoch boundary is the trained model of the phase ending there."""
    results, _ = tiny_run
    curves = results["curves"]
    assert curves["epochs"] == list(range(5))
    assert [tuple(p) for p in curves["phases"]] == [
        (0, 1, "dense"),
        (1, 2, "compressed"),
        (2, 3, "decompressed"),
        (3, 4, "compressed"),
    ]
    sp = curves["sparsity"]["acdc_0.8"]
    assert len(sp) == 5
    assert sp[0] == 0.0 and sp[1] == 0.0  # end of warm-up: dense, not yet pruned
    for end in (2, 4):  # ends of compressed phases: exactly on the mask
        assert sp[end] == pytest.approx(0.8, abs=2e-3)
    assert sp[3] < 0.4  # end of the decompressed phase: the pruned weights moved off zero
    # The dense half is the model at the end of epoch 3, before the final mask.
    assert results["acdc"]["0.8"]["dense_half"] == curves["test_accuracy"]["acdc_0.8"][3]
    assert results["acdc"]["0.8"]["dense_half_sparsity"] == sp[3]
    # GMP: masks at the first step of epochs 1, 2, 3 (cubic: 0, 0.7, 0.8), then fixed.
    gmp = curves["sparsity"]["gmp_0.8"]
    assert gmp[:3] == [0.0, 0.0, 0.0]
    assert gmp[3] == pytest.approx(0.7, abs=2e-3) and gmp[4] == pytest.approx(0.8, abs=2e-3)
    # The ftdense member continues the dense half densely from epoch 3: shares epochs 0-3.
    ft = curves["test_accuracy"]["acdc_0.8_dense_finetune"]
    assert ft[:4] == curves["test_accuracy"]["acdc_0.8"][:4]
    assert results["acdc"]["0.8"]["dense_finetuned"] == ft[-1]
    ft_sparsity = curves["sparsity"]["acdc_0.8_dense_finetune"]
    assert ft_sparsity[-1] < 0.4  # trained densely: pruned weights moved off zero
    assert results["dense_at_final_start"] == curves["test_accuracy"]["dense"][3]
    one = curves["sparsity"]["oneshot_finetune_0.8"]
    assert one[:3] == [0.0, 0.0, 0.0] and one[3] == pytest.approx(0.8, abs=2e-3)


def test_memorisation_tracks_relabelled_examples(tiny_run):
    results, _ = tiny_run
    mem = results["memorisation"]
    assert mem["num_relabelled"] == round(0.1 * mem["train_size"])
    assert len(mem["dense"]) == len(mem["acdc"]) == 5
    assert all(0.0 <= a <= 1.0 for a in mem["dense"] + mem["acdc"])
    changes = mem["acdc_phase_changes"]
    assert len(changes["compressed"]) == 2 and len(changes["decompressed"]) == 1
    assert changes["compressed"][0] == pytest.approx(mem["acdc"][2] - mem["acdc"][1])
    extremes = mem["acdc_phase_extremes"]
    # One-epoch phases: the extreme inside is the end value.
    assert extremes["compressed"] == pytest.approx(changes["compressed"])
    assert extremes["decompressed"] == pytest.approx(changes["decompressed"])


def test_phase_extremes_see_a_drop_that_recovers_inside_the_phase():
    from experiments.acdc.train import _phase_changes, _phase_extremes

    curve = [0.1, 0.5, 0.2, 0.6, 0.7, 0.9]
    phases = ((0, 1, "dense"), (1, 3, "compressed"), (3, 5, "decompressed"))
    assert _phase_changes(curve, phases)["compressed"] == pytest.approx([0.1])
    assert _phase_extremes(curve, phases)["compressed"] == pytest.approx([-0.3])
    assert _phase_extremes(curve, phases)["decompressed"] == pytest.approx([0.3])


def test_timeline_and_cosine_lr():
    config = default.get_config()  # 30 epochs: W = C = D = 3, L = 6
    timeline = make_timeline(config, 10)
    assert timeline.phases == (
        (0, 3, "dense"),
        (3, 6, "compressed"),
        (6, 9, "decompressed"),
        (9, 12, "compressed"),
        (12, 15, "decompressed"),
        (15, 18, "compressed"),
        (18, 24, "decompressed"),
        (24, 30, "compressed"),
    )
    schedule = timeline.acdc
    # Each boundary is one step after the epoch boundary.
    assert schedule.phase_at(30) == "dense" and schedule.phase_at(31) == "compressed"
    assert schedule.phase_at(240) == "decompressed" and schedule.phase_at(241) == "compressed"
    assert (timeline.gmp_begin_step, timeline.gmp_end_step) == (31, 241)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        make_timeline(config, 1)
    lr = cosine_lr(config.replace(lr_warmup_epochs=2), 10)
    assert float(lr(0)) == pytest.approx(0.05)  # warm-up: base * (e + 1) / w
    assert float(lr(19)) == pytest.approx(0.1)
    assert float(lr(20)) == pytest.approx(0.1)  # cosine starts at base
    assert float(lr(299)) == pytest.approx(0.05 * (1 + math.cos(math.pi * 27 / 28)), rel=1e-5)
    tail = cosine_lr(config, 10, offset_steps=240)
    assert float(tail(0)) == pytest.approx(float(cosine_lr(config, 10)(240)))


def test_configs_validate():
    assert default.get_config().validate().dataset == "fashion_mnist"
    assert quick.get_config().validate().phase_epochs() == (1, 1, 1, 2)
    with pytest.raises(ValueError, match="sparsities"):
        Config(sparsities=(0.9, 1.0)).validate()
    with pytest.raises(ValueError, match="epochs"):
        Config(epochs=3).validate()
    with pytest.raises(ValueError, match="phases must be None or"):
        Config(phases=(1, 0, 1, 1)).validate()
    assert Config(epochs=10, phases=(2, 1, 2, 3)).validate().phase_epochs() == (2, 1, 2, 3)
    with pytest.raises(ValueError, match="AC/DC timeline needs"):
        Config(epochs=10, phases=(4, 2, 2, 3)).validate()
    with pytest.raises(ValueError, match="memorisation must be one of"):
        Config(memorisation="maybe").validate()
    with pytest.raises(ValueError, match="memorisation_fraction"):
        Config(memorisation_fraction=1.5).validate()
    with pytest.raises(TypeError, match="config"):
        run({"dataset": "digits"})


def test_cli_phases_and_memorisation_flags():
    args = cli.build_parser().parse_args(["--phases", "2:1:2:3", "--memorisation", "only"])
    assert args.phases == (2, 1, 2, 3) and args.memorisation == "only"
    assert cli.build_parser().parse_args(["--phases", "none"]).phases is None


def test_memorisation_only_runs_just_the_random_label_runs(tmp_path):
    config = _tiny().replace(memorisation="only", memorisation_epochs=5)
    results = run(config, tmp_path)
    assert "dense" not in results and "curves" not in results
    mem = results["memorisation"]
    assert len(mem["dense"]) == len(mem["acdc"]) == 6
    assert (tmp_path / "memorisation.png").read_bytes()[:8] == PNG
    assert not (tmp_path / "accuracy_curves.png").exists()
    assert "memorisation" in format_table(results)
    with pytest.raises(ValueError, match="memorisation_epochs"):
        config.replace(memorisation_epochs=0).validate()


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------

# 4 epochs of 4 steps (W:C:D:L 1:1:1:1), no memorisation: five short trainings per run.
RESUME = {
    "epochs": 4,
    "batch_size": 64,
    "widths": (4, 8),
    "train_subset": 256,
    "test_subset": 200,
    "sparsities": (0.8,),
    "memorisation": "no",
}
_resume_config, _flags, uninterrupted = resume_harness(quick, run, RESUME)


@pytest.mark.slow  # two short runs: about 90 s on 2 loaded cores
def test_an_interrupted_run_resumes_with_its_curves_and_snapshots(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    with preempted_at("gmp_0.8_seed0"), pytest.raises(KeyboardInterrupt):
        run(_resume_config(), tmp_path)  # GMP trained, not marked done
    stages = sorted(os.listdir(tmp_path / "stages"))
    assert stages == [
        "acdc_0.8_dense_finetune_seed0.json",
        "acdc_0.8_seed0.json",
        "dense_seed0.json",
    ]
    # The per-epoch curves of finished stages and the epoch-3 snapshots come back from disk:
    # the fine-tuning of the dense snapshot (not yet run) and every curve equal the reference.
    resumed = run(_resume_config(), tmp_path)
    assert without_timing(resumed) == without_timing(reference)
    assert run(_resume_config(), tmp_path)["curves"] == resumed["curves"]  # finished: read back


@pytest.mark.slow  # three short runs in fresh processes: about 90 s on 2 loaded cores
def test_a_killed_run_resumes_to_bit_identical_results(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    # killed in AC/DC's compressed phase (step 8 of 16), before its epoch-3 snapshot
    assert_killed_run_resumes("acdc", _flags(), tmp_path, "acdc_0.8_seed0/8", reference)


@pytest.mark.slow  # two sharded trainings with per-epoch evaluations: about 30 s loaded
def test_mesh_runs_the_trainings_sharded_with_their_curves(monkeypatch):
    calls = fit_calls(monkeypatch)
    config = _resume_config(
        memorisation="only", memorisation_subset=128, memorisation_epochs=4, batch_size=32
    )
    results = run(config, None, mesh="data=2,fsdp=2")
    # dense and AC/DC on the noisy labels (the per-epoch callback evaluates a local copy)
    assert [(c["mesh"], c["rule"]) for c in calls] == [("data=2,fsdp=2", "fsdp")] * 2
    mem = results["memorisation"]
    assert len(mem["dense"]) == len(mem["acdc"]) == 5  # per-epoch probe accuracies
    assert mem["acdc_sparsity"][2] == pytest.approx(0.95, abs=0.01)  # end of a C phase
