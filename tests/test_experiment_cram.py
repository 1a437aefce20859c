"""The CrAM experiment runs end to end on a tiny real setting and keeps its schema."""

from __future__ import annotations

import json
import os
import sys

import pytest

# ``experiments`` is a top-level folder of the repository, not part of the installed package.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from experiments.cram import main as cli  # noqa: E402
from experiments.cram.configs import default, quick  # noqa: E402
from experiments.cram.configs.base import Config  # noqa: E402
from experiments.cram.train import (  # noqa: E402
    build_model,
    format_table,
    make_transform,
    nm_selector,
    run,
)

METHODS = ("sgd", "cram", "cram_nm")


def _tiny(**changes) -> Config:
    return quick.get_config().replace(
        **{
            "dataset": "digits",
            "epochs": 2,
            "batch_size": 32,
            "learning_rate": 0.05,
            "widths": (8, 16),
            "sparsities": (0.5, 0.9),
            "calib_batches": 4,
            "calib_batch_size": 64,
            "progress": False,
            **changes,
        }
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
