"""The LM experiment runs end to end on a tiny GPT, keeps its schema and resumes from its
checkpoints."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from experiments.lm.configs import default, quick
from experiments.lm.configs.base import Config
from experiments.lm.train import criteria, format_table, run
from jaxcompress import prune

DATA = os.environ.get("JAXCOMPRESS_DATA_DIR", "/work/shared/data")
pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(DATA, "tinyshakespeare", "input.txt")),
    reason="Tiny Shakespeare not found",
)

# Wanda and SparseGPT join the run once jaxcompress.prune has them.
PRUNERS = ("magnitude", *(p for p in ("wanda", "sparsegpt") if hasattr(prune, p)))


def _tiny(**changes) -> Config:
    config = Config(
        data_dir=DATA,
        iters=10,
        batch_size=4,
        context=16,
        num_layers=1,
        num_heads=2,
        d_model=16,
        warmup_iters=2,
        pruners=PRUNERS,
        sparsities=(0.5,),
        nm_patterns=((2, 4),),
        calib_windows=8,
        eval_windows=30,
        sample_chars=12,
        checkpoint_every=5,
        spdy_speedups=None,
        structured_keeps=(0.5,),
        progress=False,
    )
    return config.replace(**changes)


def _check_schema(results, trainers, pruners):
    assert results["complete"] is True
    assert list(results["models"]) == list(trainers)
    assert results["header"].startswith("tinyshakespeare: GPT 1x16")
    for trainer, entry in results["models"].items():
        assert 2.0 < entry["val_loss"] < 5.0  # near log(65) = 4.17 after 10 steps
        assert entry["perplexity"] == pytest.approx(np.exp(entry["val_loss"]))
        assert len(entry["sample"]) == 12
        assert entry["history"][-1]["step"] == 10
        assert set(entry["pruned"]) == set(pruners)
        for rows in entry["pruned"].values():
            assert set(rows) == {"50%", "2:4"}
            for label, row in rows.items():
                assert row["increase"] == pytest.approx(row["val_loss"] - entry["val_loss"])
                # AC/DC's model is already half sparse (one magnitude threshold per layer);
                # a per-column (Wanda, SparseGPT) or N:M mask on top prunes more than half.
                if trainer == "acdc":
                    assert 0.5 <= row["sparsity"] < 0.75
                else:
                    assert row["sparsity"] == pytest.approx(0.5, abs=1e-6), (trainer, label)
                assert len(row["sample"]) == 12
    assert "dense_val_loss" in results["targets"]
    structured = results["structured"]
    assert structured["dense"]["val_loss"] == pytest.approx(results["models"]["adamw"]["val_loss"])
    half = structured["0.5"]
    # the one block keeps 1 of its 2 heads and 32 of its 64 MLP units
    assert half["kept_units"] == {"blocks/0/attn/query:1.0": 1, "blocks/0/fc1": 32}
    assert half["block_params"] < 0.6 * structured["dense"]["block_params"]
    assert half["block_params_fraction"] == pytest.approx(
        half["block_params"] / structured["dense"]["block_params"]
    )
    assert half["increase"] == pytest.approx(half["val_loss"] - structured["dense"]["val_loss"])
    assert half["decode_ms_per_token"] > 0 and half["finetune_seconds"] > 0
    assert 2.0 < structured["dense"]["finetuned_val_loss"] < 5.0
    table = format_table(results)
    assert "AdamW" in table and "2:4" in table and "keep   0.5" in table


def test_run_writes_schema_and_resumes(tmp_path):
    config = _tiny(trainers=("adamw",), pruners=("magnitude",))
    results = run(config, tmp_path)
    _check_schema(results, ("adamw",), ("magnitude",))
    assert results["models"]["adamw"]["block_sparsity"] == 0.0
    assert results["models"]["adamw"]["resumed_from"] == 0
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["models"] == json.loads(json.dumps(results["models"]))
    assert (tmp_path / "loss_increase.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A rerun reads the finished stage back; without the stage file the model comes back from
    # its checkpoint, untrained further, with the same numbers.
    assert run(config, tmp_path)["models"] == on_disk["models"]
    for stage in (tmp_path / "stages").glob("adamw-*.json"):  # the structured stage stays
        stage.unlink()
    again = run(config, tmp_path)["models"]["adamw"]
    assert again["resumed_from"] == 10
    assert again["val_loss"] == results["models"]["adamw"]["val_loss"]
    assert again["history"] == results["models"]["adamw"]["history"]


@pytest.mark.slow
def test_run_every_trainer_and_pruner(tmp_path):
    results = run(_tiny(spdy_speedups=(1.5, 2.0)), tmp_path)
    _check_schema(results, ("adamw", "cram", "acdc"), PRUNERS)
    for key in ("1.5x", "2x"):
        entry = results["spdy"][key]
        target = float(key[:-1])
        assert entry["uniform"]["modelled_speedup"] >= target - 1e-9
        assert entry["spdy"]["modelled_speedup"] >= target - 1e-9
        assert set(entry["uniform"]["profile"].values()) == {entry["uniform_sparsity"]}
        assert len(entry["spdy"]["profile"]) == 6  # q, k, v, out, fc1, fc2 of the one block
    assert "spdy_vs_uniform_1.5x" in results["targets"]
    # AC/DC ends in a compressed phase: its blocks are already half sparse.
    assert results["models"]["acdc"]["block_sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert "cram_vs_adamw_magnitude_50%" in results["targets"]
    assert "CrAM+" in format_table(results) and "AC/DC" in format_table(results)


def test_configs_validate_and_criteria():
    config = default.get_config().validate()
    assert (config.num_layers, config.num_heads, config.d_model, config.context) == (4, 4, 128, 64)
    assert (config.iters, config.batch_size) == (2000, 12)
    assert quick.get_config().validate().iters < config.iters
    assert list(criteria(config)) == ["50%", "70%", "2:4", "4:8"]
    with pytest.raises(ValueError, match="sparsities"):
        Config(sparsities=(0.5, 1.0)).validate()
    with pytest.raises(ValueError, match="nm_patterns"):
        Config(nm_patterns=((4, 4),)).validate()
    with pytest.raises(ValueError, match="divisible by m"):
        Config(d_model=36, num_heads=4, nm_patterns=((2, 8),)).validate()
    with pytest.raises(ValueError, match="trainers"):
        Config(trainers=("sgd",)).validate()
    with pytest.raises(ValueError, match="warmup_iters"):
        Config(iters=10, warmup_iters=10).validate()
    with pytest.raises(ValueError, match="divisible by num_heads"):
        Config(d_model=130).validate()


def test_unavailable_pruner_is_a_clear_error_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delattr(prune, "wanda", raising=False)
    with pytest.raises(ValueError, match="jaxcompress.prune.wanda is not available"):
        run(_tiny(pruners=("magnitude", "wanda")), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_rejects_bad_flags_before_any_work(tmp_path, capsys):
    from experiments.lm.main import main

    out = tmp_path / "out"
    for argv, message in (
        (["--iters", "0"], "iters must be a positive int"),
        (["--nm-patterns", "2:4,3:3"], "nm_patterns"),
        (["--trainers", "sgd"], "trainers"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--out", str(out)])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not out.exists()
