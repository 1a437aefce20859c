"""The shared pieces of the experiments: flags generated from configs (experiments/cli.py) and
experiments/_common.py (out and mesh checks, aggregation over seeds, run header)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np
import pytest

from experiments import _common, cli
from experiments._common import ConfigBase, field
from experiments.cli import comma_separated, non_negative_int, positive_int


@dataclasses.dataclass(frozen=True)
class _Config(ConfigBase):
    name: str = field("a", "a name", choices=("a", "b"))
    count: int = field(3, "a count", aliases=("--n",))
    rate: float = field(0.5, "a rate")
    subset: int | None = field(None, "a subset")
    widths: tuple[int, ...] = field((16, 32), "widths")
    names: tuple[str, ...] = field(("a",), "names", choices=("a", "b"))
    pattern: tuple[int, int] | None = field((2, 4), "a pattern")
    patterns: tuple[tuple[int, int], ...] = field(((2, 4), (4, 8)), "patterns")
    flag: bool = field(True, "a flag")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p", exit_on_error=False)
    cli.add_config_flags(parser, _Config)
    return parser


def test_flags_are_generated_from_the_fields():
    args = _parser().parse_args(
        ["--name", "b", "--n", "7", "--rate", "1e-3", "--subset", "none", "--widths", "8, 16",
         "--names", "b,a", "--pattern", "1:4", "--patterns", "1:2,2:4", "--no-flag"]
    )  # fmt: skip
    assert vars(args) == {
        "name": "b",
        "count": 7,
        "rate": 1e-3,
        "subset": None,
        "widths": (8, 16),
        "names": ("b", "a"),
        "pattern": (1, 4),
        "patterns": ((1, 2), (2, 4)),
        "flag": False,
    }
    assert vars(_parser().parse_args([])) == {}  # nothing given: the config decides
    assert _parser().parse_args(["--subset", "12", "--pattern", "None"]).subset == 12
    help_text = _parser().format_help()
    assert "a pattern (default 2:4)" in help_text and "patterns (default 2:4,4:8)" in help_text
    assert "a subset (default none)" in help_text and "widths (default 16,32)" in help_text


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--name", "c"], "expected one of a, b, got 'c'"),
        (["--count", "1.5"], "expected an integer, got '1.5'"),
        (["--rate", "fast"], "expected a number, got 'fast'"),
        (["--subset", "all"], "expected an integer, or none, got 'all'"),
        (["--widths", "8,,16"], "expected comma-separated items, each an integer"),
        (["--names", "a,c"], "each one of a, b"),
        (["--pattern", "2:4:8"], "integers such as 2:4, or none"),
        (["--patterns", "2-4"], "integers such as 2:4, got '2-4'"),
    ],
)
def test_bad_flag_values_name_what_was_expected(argv, expected):
    with pytest.raises(argparse.ArgumentError, match=expected):
        _parser().parse_args(argv)


def test_a_field_without_help_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Bare:
        x: int = 1

    with pytest.raises(TypeError, match="Bare.x has no help"):
        cli.add_config_flags(argparse.ArgumentParser(), Bare)


def test_config_replace_names_an_unknown_field():
    assert _Config().replace(count=4).count == 4
    with pytest.raises(TypeError, match=r"has no field 'cout'; its fields are .*count"):
        _Config().replace(cout=4)


def test_parse_mesh():
    assert _common.parse_mesh("data=8", 8) == {"data": 8}
    assert _common.parse_mesh(" data=4, fsdp=2 ", 8) == {"data": 4, "fsdp": 2}
    for text, match in [
        ("", "mesh must be"),
        ("data", "expected axis=size"),
        ("model=2", "unknown axis 'model'"),
        ("data=0", "size of 'data' must be a positive int, got '0'"),
        ("data=-2", "positive int"),
        ("data=two", "positive int"),
        ("data=2,data=2", "given twice"),
        ("data=4,fsdp=4", "needs 16 devices, but only 8 exist"),
    ]:
        with pytest.raises(ValueError, match=match):
            _common.parse_mesh(text, 8)
    with pytest.raises(ValueError, match="needs 4096 devices"):
        _common.parse_mesh("data=4096")  # the devices that exist


def test_check_out_creates_and_probes(tmp_path):
    out = tmp_path / "a" / "b"
    assert _common.check_out(out) == str(out) and out.is_dir()
    assert list(out.iterdir()) == []  # the write probe leaves nothing behind
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        _common.check_out(afile)
    with pytest.raises(ValueError, match="cannot write to .*file/sub'"):
        _common.check_out(afile / "sub")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="cannot write to"):
            _common.check_out(ro)


def test_aggregate_matches_numpy():
    rng = np.random.default_rng(0)
    records = [
        {"seed": k, "acc": {"sgd": float(a)}, "curve": list(map(float, c))}
        for k, (a, c) in enumerate(zip(rng.random(3), rng.random((3, 4)), strict=True))
    ]
    mean, std = _common.aggregate(records, keep=("seed",))
    accs = np.array([r["acc"]["sgd"] for r in records])
    curves = np.array([r["curve"] for r in records])
    assert mean["seed"] == 0 and std["seed"] == 0  # kept from the first record
    assert mean["acc"]["sgd"] == pytest.approx(accs.mean())
    assert std["acc"]["sgd"] == pytest.approx(accs.std(ddof=1))
    np.testing.assert_allclose(mean["curve"], curves.mean(0))
    np.testing.assert_allclose(std["curve"], curves.std(0, ddof=1))
    assert _common.aggregate(records[:1]) == (
        {"seed": 0.0, "acc": records[0]["acc"], "curve": records[0]["curve"]},
        None,
    )
    with pytest.raises(ValueError, match="at least one record"):
        _common.aggregate([])


def test_run_header_says_what_was_run():
    config = argparse.Namespace(dataset="mnist", epochs=3)
    sizes = {"train": 6000, "test": 10000, "train_full": 60000, "test_full": 10000}
    assert (
        _common.run_header(config, sizes, [0, 1], model="small_cnn")
        == "mnist: train 6,000 of 60,000, test 10,000; 3 epochs; seeds 0, 1; model small_cnn"
    )


def test_integer_argument_types():
    assert positive_int("3") == 3 and non_negative_int("0") == 0
    for fn, bad in ((positive_int, "0"), (positive_int, "1.5"), (non_negative_int, "-1")):
        with pytest.raises(argparse.ArgumentTypeError):
            fn(bad)


def test_comma_separated_casts_strips_and_validates():
    ints = comma_separated(int, valid=lambda v: v > 0, expected="positive integers")
    assert ints("16, 32,64") == (16, 32, 64)
    for bad in ("", "16,,32", "16,x", "0,4", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"expected positive integers, got"):
            ints(bad)


@pytest.mark.parametrize("name", ["oneshot", "cram", "acdc", "spdy", "lm", "surrogate"])
def test_experiment_configs_are_thin_and_their_ablations_valid(name):
    import importlib

    base = importlib.import_module(f"experiments.{name}.configs.base")
    configs = {
        kind: importlib.import_module(f"experiments.{name}.configs.{kind}")
        for kind in ("default", "quick")
    }
    fields = dataclasses.fields(base.Config)
    # lm runs five stages (train, one-shot, SPDY, structured, report): one field more
    assert len(fields) <= (26 if name == "lm" else 25), [f.name for f in fields]
    assert all(f.metadata.get("help") for f in fields)  # one flag each, with its help
    for module in configs.values():
        assert isinstance(module.get_config().validate(), base.Config)
    path = os.path.join("experiments", name, "configs", "ablations.toml")
    if not os.path.exists(path):
        return
    ablations = _common.read_ablations(base.Config, path)
    built = _common.ablation_configs(ablations, configs)
    assert len(built) == sum(len(a["variants"]) for a in ablations.values())
    with pytest.raises(TypeError, match="has no field"):
        _common.ablation_configs({"x": {"base": "quick", "variants": {"a": {"nope": 1}}}}, configs)


def test_override_files_are_read_as_the_fields_types(tmp_path):
    path = tmp_path / "quick.toml"
    path.write_text(
        'name = "b"  # why\ncount = 7\nrate = 1\nsubset = 10\nwidths = [8, 16]\n'
        "pattern = [4, 8]\npatterns = [[1, 2]]\nflag = false\n"
    )
    config = _common.config_from_file(_Config, path)
    assert config == _Config(
        name="b", count=7, rate=1.0, subset=10, widths=(8, 16), pattern=(4, 8),
        patterns=((1, 2),), flag=False,
    )  # fmt: skip
    assert isinstance(config.rate, float)
    assert _common.read_overrides(_Config, path)["widths"] == (8, 16)


def test_a_later_override_file_replaces_an_earlier_ones_values(tmp_path):
    shared, own = tmp_path / "shared.toml", tmp_path / "quick.toml"
    shared.write_text("count = 7\nrate = 0.25\n")
    own.write_text("rate = 0.125\n")
    assert _common.config_from_file(_Config, shared, own) == _Config(count=7, rate=0.125)


@pytest.mark.parametrize(
    "text, match",
    [
        ("nope = 1", r"quick.toml: .*_Config has no field 'nope'"),
        ('count = "7"', r"quick.toml: count must be an integer, got '7'"),
        ("count = true", r"quick.toml: count must be an integer, got True"),
        ('widths = [8, "x"]', r"quick.toml: widths\[1\] must be an integer"),
        ("pattern = [2, 4, 8]", r"quick.toml: pattern must be an array of 2 items"),
        ("flag = 1", r"quick.toml: flag must be true or false"),
    ],
)
def test_override_files_reject_unknown_fields_and_wrong_types(tmp_path, text, match):
    path = tmp_path / "quick.toml"
    path.write_text(text + "\n")
    with pytest.raises(TypeError, match=match):
        _common.read_overrides(_Config, path)
    path.write_text("count = [\n")
    with pytest.raises(ValueError, match="quick.toml: not a TOML file"):
        _common.read_overrides(_Config, path)


def test_ablation_files_are_read_and_checked(tmp_path):
    path = tmp_path / "ablations.toml"
    path.write_text(
        '# why\n[x]\nbase = "quick"\ncommon = { widths = [8] }\n'
        'variants = { "0.5" = { rate = 1 }, b = {} }\n'
    )
    assert _common.read_ablations(_Config, path) == {
        "x": {
            "base": "quick",
            "common": {"widths": (8,)},
            "variants": {"0.5": {"rate": 1.0}, "b": {}},
        }
    }


_QUICK = '[x]\nbase = "quick"\n'


@pytest.mark.parametrize(
    "text, error, match",
    [
        (_QUICK + "variants = { a = { nope = 1 } }", TypeError, r"x.variants.a: .*no field 'nope'"),
        (_QUICK + "variants = { a = { count = 0.5 } }", TypeError, r"x.variants.a.count must be"),
        (_QUICK + "common = 3\nvariants = { a = {} }", TypeError, r"x.common must be a table"),
        ('[x]\nbase = "full"\nvariants = { a = {} }', ValueError, r"x.base must be 'default'"),
        (_QUICK, TypeError, r"x.variants must be a table of variants"),
        (_QUICK + "variant = { a = {} }", TypeError, r"x must be a table of base, common"),
    ],
)
def test_ablation_files_reject_bad_tables(tmp_path, text, error, match):
    path = tmp_path / "ablations.toml"
    path.write_text(text + "\n")
    with pytest.raises(error, match="ablations.toml: " + match):
        _common.read_ablations(_Config, path)


# Each experiment rejects a bad flag in one line on stderr (status 2), before any work (nothing
# is written to --out); the flags are generated from the configs, so a few cases per experiment
# cover every kind. These checks every image experiment shares are listed once.
_SHARED_BAD_FLAGS = [
    (["--dataset", "cifar10"], "argument --dataset: expected one of fashion_mnist, mnist, digits"),
    (["--data-dir", "/nonexistent/dir"], "not a directory"),
    (["--out", "/etc/hostname/sub"], "out: cannot write to '/etc/hostname/sub'"),
]


@pytest.mark.parametrize(
    "experiment, argv, match",
    [
        *[
            (experiment, argv, match)
            for experiment in ("acdc", "oneshot", "cram", "surrogate")
            for argv, match in _SHARED_BAD_FLAGS
        ],
        ("acdc", ["--epochs", "0"], "epochs must be a positive int"),
        ("acdc", ["--seeds", "0"], "num_seeds must be a positive int"),
        ("acdc", ["--widths", "16,x"], "argument --widths: expected comma-separated items"),
        ("acdc", ["--epochs", "2"], "epochs"),
        ("acdc", ["--phases", "1:1:1"], "argument --phases: expected"),
        (
            "acdc",
            ["--memorisation", "maybe"],
            "argument --memorisation: expected one of yes, no, only",
        ),
        ("oneshot", ["--epochs", "0"], "epochs must be a positive int"),
        ("oneshot", ["--seed", "-1"], "seed must be a non-negative int"),
        ("oneshot", ["--nm", "4:2"], "nm must be None or a pair"),
        ("oneshot", ["--nm", "2"], "argument --nm: expected"),
        ("cram", ["--epochs", "0"], "epochs must be a positive int, got 0"),
        ("cram", ["--epochs", "1.5"], "argument --epochs: expected an integer, got '1.5'"),
        ("cram", ["--seeds", "0"], "num_seeds must be a positive int, got 0"),
        ("cram", ["--rho", "-1"], "rho must be a float in [0.0, inf), got -1.0"),
        ("cram", ["--rho", "nan"], "rho must be a float"),
        ("cram", ["--methods", "sgd,adam"], "argument --methods: expected comma-separated items"),
        ("cram", ["--methods", "sgd,sgd"], "methods must be a non-empty tuple of distinct names"),
        ("cram", ["--nm-patterns", "2:4,4"], "argument --nm-patterns: expected"),
        ("cram", ["--nm-patterns", "4:2"], "nm_patterns must be"),
        ("cram", ["--train-subset", "0"], "train_subset must be a positive int or None"),
        ("cram", ["--mesh", "model=2"], "mesh: unknown axis 'model'"),
        ("cram", ["--mesh", "data=0"], "mesh: size of 'data' must be a positive int"),
        ("cram", ["--mesh", "data=4096"], "needs 4096 devices"),
        ("cram", ["--num-processes", "0"], "argument --num-processes: expected a positive"),
        ("lm", ["--mesh", "data=2"], "trains on one device: leave --mesh and --num-processes"),
        ("lm", ["--num-processes", "2"], "trains on one device"),
        ("cram", ["--rho"], "expected one argument"),
        ("surrogate", ["--tasks", "cnn,resnet"], "tasks"),
        ("surrogate", ["--seeds", "0"], "num_seeds"),
        ("surrogate", ["--epochs", "-1"], "epochs"),
        ("surrogate", ["--targets", "0.5,1.5"], "targets"),
        ("surrogate", ["--epochs", "2", "--finetune-epochs", "2"], "finetune_epochs"),
        ("surrogate", ["--gain", "abc"], "expected a number"),
    ],
)
def test_cli_rejects_bad_flags_in_one_line(experiment, argv, match, capsys, tmp_path):
    import importlib

    main = importlib.import_module(f"experiments.{experiment}.main").main
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--out", str(tmp_path / "out"), *argv])  # argv's own --out wins
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "run.json").exists()  # nothing written


# --------------------------------------------------------------------------------------------
# Resumable runs and the process launcher
# --------------------------------------------------------------------------------------------


def test_open_run_refuses_another_config_and_restart_starts_over(tmp_path):
    from experiments.cram.configs import quick

    config = quick.get_config()
    assert _common.check_resume(config, tmp_path) is False  # nothing there yet
    run = _common.open_run(config, tmp_path)
    assert (tmp_path / "run.json").is_file()
    assert run.stage("sgd_seed0") is None
    record = run.finish_stage("sgd_seed0", {"history": [{"epoch": 1, "loss": 0.5}], "t": (1, 2)})
    assert record == {"history": [{"epoch": 1, "loss": 0.5}], "t": [1, 2]}  # the JSON form
    assert _common.open_run(config, tmp_path).stage("sgd_seed0") == record
    kwargs = run.fit_kwargs("sgd_seed0")
    assert kwargs["checkpoint_dir"] == str(tmp_path / "checkpoints" / "sgd_seed0")
    assert kwargs["config"]["stage"] == "sgd_seed0" and kwargs["config"]["rho"] == 0.1
    assert "progress" not in kwargs["config"]  # a resume may change it
    _common.open_run(config.replace(progress=False), tmp_path)
    # another config: refused naming every differing field, before anything is written
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=r"epochs: saved 3, now 4; rho: saved 0.1, now 0.2"):
        _common.open_run(config.replace(epochs=4, rho=0.2), tmp_path)
    with pytest.raises(ValueError, match=r"--restart"):
        _common.check_resume(config.replace(epochs=4), tmp_path)
    assert sorted(os.listdir(tmp_path)) == before
    # --restart deletes the earlier run's files (and only those)
    (tmp_path / "notes.txt").write_text("mine")
    restarted = _common.open_run(config.replace(epochs=4), tmp_path, restart=True)
    assert restarted.stage("sgd_seed0") is None and (tmp_path / "notes.txt").is_file()
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "run.json"]
    assert _common.open_run(config.replace(epochs=4), None).fit_kwargs("x") == {}
    assert _common.fit_options("data=4,fsdp=2") == {
        "mesh": "data=4,fsdp=2",
        "param_sharding": "fsdp",
    }


def test_a_finished_run_is_read_back_not_rerun(tmp_path, capsys):
    import json

    from experiments.oneshot import main as oneshot_main
    from experiments.oneshot.configs import quick
    from experiments.oneshot.train import run

    config = quick.get_config().replace(dataset="digits", progress=False)
    _common.open_run(config, tmp_path).write_results({"finished": True})
    assert run(config, tmp_path) == {"finished": True}  # no data loaded, nothing trained
    assert json.loads((tmp_path / "results.json").read_text()) == {"finished": True}
    with pytest.raises(SystemExit) as exc:  # the CLI refuses another config in one line
        oneshot_main.main(
            ["--quick", "--dataset", "digits", "--epochs", "9", "--out", str(tmp_path)]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "epochs: saved 3, now 9" in err and len(err.strip().splitlines()) == 1, err


def test_a_process_that_cannot_reach_its_coordinator_fails_in_one_line(tmp_path):
    import subprocess

    from _util import ROOT, free_port, subprocess_env

    env = subprocess_env(
        JAXCOMPRESS_COORDINATOR=f"127.0.0.1:{free_port()}",  # nobody listens there
        JAXCOMPRESS_NUM_PROCESSES="2",
        JAXCOMPRESS_PROCESS_ID="1",
        JAXCOMPRESS_INIT_TIMEOUT="1",
    )
    cmd = [sys.executable, "-m", "experiments.oneshot", "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert "could not be reached within 1 s" in err and "Traceback" not in err, err


def test_the_launcher_reaps_every_process_and_names_the_one_that_failed(tmp_path, capsys):
    from experiments import _launch

    # a module that fails at once in process 1 and would run for a minute in process 0
    (tmp_path / "jc_launch_probe.py").write_text(
        "import os, sys, time\n"
        "if os.environ['JAXCOMPRESS_PROCESS_ID'] == '1':\n"
        "    sys.exit('probe: process 1 fails')\n"
        "time.sleep(60)\n"
    )
    sys.path.insert(0, str(tmp_path))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    try:
        code = _launch.spawn(2, [], module="jc_launch_probe")
    finally:
        sys.path.remove(str(tmp_path))
        os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].split(os.pathsep, 1)[1]
    assert code == 1
    err = capsys.readouterr().err
    assert "process 1 of 2 failed with exit status 1" in err and "probe: process 1 fails" in err
