"""The one-shot pruning experiment runs end to end on a tiny real setting and keeps its schema."""

from __future__ import annotations

import json

import pytest
from _util import fit_calls, tiny_config

from experiments.oneshot import main as cli
from experiments.oneshot.configs import default, quick
from experiments.oneshot.configs.base import Config
from experiments.oneshot.train import format_table, run


def _tiny() -> Config:
    return tiny_config(quick, epochs=3, widths=(8, 16), sparsities=(0.5, 0.8), calib_batches=5)


def test_run_writes_schema_and_files(tmp_path):
    results = run(_tiny(), tmp_path)
    assert 0.6 < results["dense_accuracy"] <= 1.0
    assert results["header"].startswith("digits: train 1,438, test 359; 3 epochs; seed 0")
    assert set(results["oneshot"]) == {"0.5", "0.8"}
    for entry in [*results["oneshot"].values(), results["nm_2_4"]]:
        assert 0.0 <= entry["raw"] <= 1.0 and 0.0 <= entry["bn_recalibrated"] <= 1.0
    assert results["oneshot"]["0.8"]["actual_sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert 0.3 < results["nm_2_4"]["actual_sparsity"] <= 0.5
    assert results["config"]["dataset"] == "digits"
    assert results["timing"]["total_seconds"] > 0
    assert len(results["history"]) == 3
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["oneshot"] == results["oneshot"]
    assert (tmp_path / "accuracy_vs_sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    table = format_table(results)
    assert "global 0.8" in table and "N:M 2:4" in table


def test_configs_validate():
    assert default.get_config().validate().dataset == "fashion_mnist"
    assert quick.get_config().validate().epochs >= 1
    with pytest.raises(ValueError, match="sparsities"):
        Config(sparsities=(0.5, 1.0)).validate()
    with pytest.raises(ValueError, match="nm"):
        Config(nm=(4, 4)).validate()
    with pytest.raises(ValueError, match="calib_mode"):
        Config(calib_mode="median").validate()
    with pytest.raises(TypeError, match="config"):
        run({"dataset": "digits"})


def test_cli_nm_none_skips_nm():
    args = cli.build_parser().parse_args(["--nm", "none", "--sparsities", "0.5"])
    assert args.nm is None and args.sparsities == (0.5,)


@pytest.mark.slow  # a short sharded run: about 17 s loaded
def test_fsdp_mesh_trains_sharded(monkeypatch):
    calls = fit_calls(monkeypatch)
    config = _tiny().replace(epochs=1, train_subset=320, nm=None)
    results = run(config, None, mesh="data=2,fsdp=2")
    assert calls == [{"mesh": "data=2,fsdp=2", "rule": "fsdp", "devices": 4}]
    assert 0.2 < results["dense_accuracy"] <= 1.0
    assert results["environment"]["mesh"] == "data=2,fsdp=2"
