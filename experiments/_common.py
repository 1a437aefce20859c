"""What the experiments share: config fields and checks, data, the SGD every experiment trains
with, one-shot pruning with BatchNorm recalibration, seeds and their aggregation, the run
header, the environment record, atomic result files, the checks of ``--out`` and ``--mesh``,
and resumable runs (:func:`open_run`: ``run.json``, stage markers, per-stage checkpoints).

Each experiment's ``train.py`` holds only its own pipeline (:func:`experiment_run` makes its
public ``run`` from it: the checks, the resume and a finished run's results are shared); its
``configs/base.py`` declares its fields with :func:`field` (default, type and help in one
place), from which ``experiments.cli`` generates the command line.

This module imports only the standard library and NumPy at the top: jax, flax, optax and
jaxcompress are imported by the functions that use them, so that a command line parses its
flags, validates the config and checks ``--out`` in well under a second (jax alone takes
seconds to import on a loaded machine) and a bad value fails before any heavy work.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import platform
import tempfile
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "CALIBRATION_MODES",
    "ConfigBase",
    "DataConfig",
    "DATASETS",
    "MESH_AXES",
    "MODELS",
    "QUICK_RECALIBRATION_FILE",
    "RecalibrationConfig",
    "Run",
    "SGDConfig",
    "ablation_configs",
    "aggregate",
    "build_model",
    "check_bools",
    "check_calibration",
    "check_choices",
    "check_config",
    "check_floats",
    "check_fractions",
    "check_ints",
    "check_out",
    "check_path",
    "check_resume",
    "check_source",
    "check_widths",
    "config_from_file",
    "environment",
    "experiment_run",
    "field",
    "fit_options",
    "fit_stage",
    "is_int",
    "is_primary",
    "is_real",
    "load_datasets",
    "local_model",
    "make_sgd",
    "nm_selector",
    "open_run",
    "parse_mesh",
    "prepare_run",
    "prune_and_measure",
    "read_ablations",
    "read_overrides",
    "run_header",
    "seed_list",
    "stage_bar",
    "train_sgd",
    "write_json_atomic",
]

DATASETS = ("fashion_mnist", "mnist", "digits")
CALIBRATION_MODES = ("ema", "cumulative")
#: The BatchNorm CNNs of ``cram`` and ``acdc`` (:func:`build_model`).
MODELS = ("small_cnn", "resnet8")
#: Mesh axis names ``--mesh`` accepts: data parallelism and fully sharded data parallelism.
MESH_AXES = ("data", "fsdp")


# --------------------------------------------------------------------------------------------
# Config fields and their checks
# --------------------------------------------------------------------------------------------


#: The quick settings the one-shot experiments (``oneshot``, ``cram``) share: a TOML file of
#: overrides (:func:`config_from_file`), each value with its reason.
QUICK_RECALIBRATION_FILE = os.path.join(os.path.dirname(__file__), "quick_recalibration.toml")


def field(default: Any, help: str, **metadata: Any) -> Any:  # noqa: A002 - argparse's word
    """A config dataclass field with its help text (and e.g. ``choices``) in its metadata.

    ``experiments.cli`` builds one flag per field from its name, type, default and this
    metadata; ``choices`` restricts a ``str`` field, or every item of a tuple of ``str``.
    """
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# Each check raises a ``ValueError`` (``TypeError`` for a wrongly typed path or flag) naming the
# field, the value and what was expected.


def check_source(config: Any, datasets: tuple[str, ...] = DATASETS) -> None:
    """``config.dataset`` in ``datasets``; ``config.data_dir`` a str path or None."""
    if config.dataset not in datasets:
        raise ValueError(f"dataset must be one of {datasets}, got {config.dataset!r}")
    check_path(config, "data_dir")


def check_path(config: Any, name: str) -> None:
    """``config.<name>`` a str path or None (a ``TypeError`` naming the field otherwise)."""
    value = getattr(config, name)
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a str path or None, got {value!r}")


def check_ints(config: Any, names: Sequence[str], *, minimum: int = 1, optional: bool = False):
    """Every field in ``names`` an int >= ``minimum`` (1 or 0), or None with ``optional``."""
    what = {1: "a positive int", 0: "a non-negative int"}.get(minimum, f"an int >= {minimum}")
    for name in names:
        value = getattr(config, name)
        if optional and value is None:
            continue
        if not is_int(value) or value < minimum:
            suffix = " or None" if optional else ""
            raise ValueError(f"{name} must be {what}{suffix}, got {value!r}")


def check_floats(config: Any, ranges: Sequence[tuple[str, float, float]]) -> None:
    """Every ``(name, lo, hi)`` field a real number in ``[lo, hi)``."""
    for name, lo, hi in ranges:
        value = getattr(config, name)
        if not is_real(value) or not lo <= value < hi:
            raise ValueError(f"{name} must be a float in [{lo}, {hi}), got {value!r}")


def check_widths(config: Any, name: str = "widths") -> None:
    """A non-empty tuple of positive ints."""
    value = getattr(config, name)
    if not isinstance(value, tuple) or not value or not all(is_int(w) and w > 0 for w in value):
        raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {value!r}")


def check_choices(config: Any, name: str, choices: Sequence[str]) -> None:
    """A non-empty tuple of distinct names from ``choices``."""
    value = getattr(config, name)
    if (
        not isinstance(value, tuple)
        or not value
        or not all(v in choices for v in value)
        or len(set(value)) != len(value)
    ):
        raise ValueError(
            f"{name} must be a non-empty tuple of distinct names from {tuple(choices)}, "
            f"got {value!r}"
        )


def check_fractions(config: Any, name: str, *, zero: bool = True) -> None:
    """A non-empty tuple of distinct floats in ``[0, 1)`` (``(0, 1)`` without ``zero``)."""
    value = getattr(config, name)
    lo = "[0" if zero else "(0"
    if (
        not isinstance(value, tuple)
        or not value
        or not all(is_real(s) and (0.0 <= s if zero else 0.0 < s) and s < 1.0 for s in value)
    ):
        raise ValueError(f"{name} must be a non-empty tuple of floats in {lo}, 1), got {value!r}")
    if len({float(s) for s in value}) != len(value):
        raise ValueError(f"{name} must be distinct, got {value!r}")


def check_calibration(config: Any) -> None:
    """The BatchNorm recalibration fields ``calib_batches``, ``calib_batch_size``,
    ``calib_momentum`` (in ``(0, 1]``) and ``calib_mode`` (in :data:`CALIBRATION_MODES`)."""
    check_ints(config, ("calib_batches", "calib_batch_size"))
    if not is_real(config.calib_momentum) or not 0.0 < config.calib_momentum <= 1.0:
        raise ValueError(f"calib_momentum must be in (0, 1], got {config.calib_momentum!r}")
    if config.calib_mode not in CALIBRATION_MODES:
        raise ValueError(
            f"calib_mode must be one of {CALIBRATION_MODES}, got {config.calib_mode!r}"
        )


def check_bools(config: Any, names: Sequence[str]) -> None:
    """Every field in ``names`` a bool."""
    for name in names:
        if not isinstance(getattr(config, name), bool):
            raise TypeError(f"{name} must be a bool, got {getattr(config, name)!r}")


# --------------------------------------------------------------------------------------------
# Output directory and mesh
# --------------------------------------------------------------------------------------------


def check_out(out: str | os.PathLike) -> str:
    """Create ``out`` if needed and check that files can be written in it; return its path.

    Run before any data is loaded, so that an impossible or read-only directory fails at once.

    Raises:
      ValueError: naming the directory and the reason (not a directory, cannot be created,
        not writable).
    """
    path = os.path.abspath(os.fspath(out))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"out: {os.fspath(out)!r} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ValueError(f"out: cannot write to {os.fspath(out)!r}: {reason}") from None
    return path


def parse_mesh(text: str, num_devices: int | None = None) -> dict[str, int]:
    """``"data=8"`` or ``"data=4,fsdp=2"`` as ``{axis: size}``, checked against the devices.

    Args:
      text: comma-separated ``axis=size`` items; axes from :data:`MESH_AXES`, each once, sizes
        positive ints.
      num_devices: devices available (default ``len(jax.devices())``); the product of the
        sizes may not exceed it.

    Raises:
      ValueError: naming the item and what was expected.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"mesh must be 'axis=size[,axis=size]' such as 'data=8', got {text!r}")
    mesh: dict[str, int] = {}
    for item in text.split(","):
        name, sep, size = item.strip().partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"mesh: expected axis=size, got {item.strip()!r} in {text!r}")
        if name not in MESH_AXES:
            raise ValueError(f"mesh: unknown axis {name!r} in {text!r}; axes are {MESH_AXES}")
        if name in mesh:
            raise ValueError(f"mesh: axis {name!r} given twice in {text!r}")
        try:
            value = int(size)
        except ValueError:
            value = 0
        if value <= 0:
            raise ValueError(f"mesh: size of {name!r} must be a positive int, got {size.strip()!r}")
        mesh[name] = value
    total = math.prod(mesh.values())
    if num_devices is None:
        import jax

        num_devices = len(jax.devices())
    if total > num_devices:
        raise ValueError(f"mesh {text!r} needs {total} devices, but only {num_devices} exist")
    return mesh


# --------------------------------------------------------------------------------------------
# Resumable runs, meshes and processes
# --------------------------------------------------------------------------------------------

#: Config fields that do not change the results: a resume may change them.
NOT_COMPARED = ("progress", "data_dir")
_RUN_FILE, _RESULTS_FILE = "run.json", "results.json"
_STAGES, _CHECKPOINTS = "stages", "checkpoints"


def _config_record(config: Any) -> dict[str, Any]:
    """The fields of ``config`` that a resume must match, in their JSON form."""
    import json

    fields = dataclasses.asdict(config)
    return json.loads(json.dumps({k: v for k, v in fields.items() if k not in NOT_COMPARED}))


def _differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    return [
        f"{k}: saved {saved.get(k, '<absent>')!r}, now {now.get(k, '<absent>')!r}"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k) or (k in saved) != (k in now)
    ]


def _read_json(path: str) -> Any:
    import json

    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError) as err:
        raise ValueError(f"out: cannot read {path!r} ({err}); rerun with --restart") from None


def check_resume(config: Any, out: str | os.PathLike) -> bool:
    """Refuse to resume into ``out`` when it holds a run of another config; read only.

    Returns:
      ``True`` when ``out`` holds the finished run of this config (its ``results.json``).

    Raises:
      ValueError: naming every differing field, with the saved and the new value.
    """
    path = os.path.abspath(os.fspath(out))
    run_file = os.path.join(path, _RUN_FILE)
    if not os.path.isfile(run_file):
        return False
    saved = _read_json(run_file)
    diffs = _differences(saved.get("config", {}), _config_record(config))
    if diffs:
        raise ValueError(
            f"out: {os.fspath(out)!r} holds a run with another config ({'; '.join(diffs)}); "
            "rerun with the saved settings, use another --out, or pass --restart to start over"
        )
    return os.path.isfile(os.path.join(path, _RESULTS_FILE))


def is_primary() -> bool:
    """True on process 0 (every process of a single-process run): the one that writes files
    and shows progress."""
    import jax

    return jax.process_index() == 0


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class Run:
    """An experiment's ``--out`` as a resumable run (made by :func:`open_run`).

    Layout: ``run.json`` (the config), ``stages/<name>.json`` (the record of each finished
    stage, written atomically), ``checkpoints/<name>/`` (the training state of each stage, by
    :func:`jaxcompress.train.fit`), ``results.json`` (written last: the run is finished). With
    ``out=None`` nothing is read or written and every stage runs.

    Attributes:
      out: the absolute output directory, or ``None``.
      config: the compared fields of the config (JSON form), saved with every checkpoint.
      mesh: the mesh string training runs on (``None``: one device).
    """

    def __init__(self, out: str | None, config: Any, mesh: str | None):
        self.out, self.mesh = out, mesh
        self.config = _config_record(config)

    def results(self) -> dict[str, Any] | None:
        """The finished run's results (``results.json``), or ``None``."""
        if self.out is None or not os.path.isfile(os.path.join(self.out, _RESULTS_FILE)):
            return None
        return _read_json(os.path.join(self.out, _RESULTS_FILE))

    def stage(self, name: str) -> Any:
        """The record a finished stage ``name`` saved with :meth:`finish_stage`, or ``None``."""
        if self.out is None:
            return None
        path = os.path.join(self.out, _STAGES, f"{name}.json")
        return _read_json(path)["record"] if os.path.isfile(path) else None

    def finish_stage(self, name: str, record: Any) -> Any:
        """Mark stage ``name`` finished with its JSON-serialisable ``record`` (atomically, on
        process 0); returns ``record`` as a resume will read it back (JSON round trip)."""
        import json

        record = json.loads(json.dumps(record))
        if self.out is not None and is_primary():
            write_json_atomic(os.path.join(self.out, _STAGES, f"{name}.json"), {"record": record})
        return record

    def checkpoint_dir(self, name: str) -> str | None:
        """Where stage ``name`` checkpoints its training (``None`` without ``out``)."""
        return None if self.out is None else os.path.join(self.out, _CHECKPOINTS, name)

    def fit_kwargs(self, name: str, **config: Any) -> dict[str, Any]:
        """``fit`` arguments of stage ``name``: mesh and sharding rule (:func:`fit_options`),
        ``checkpoint_dir`` and the ``config`` a resume must match (this run's and ``config``'s
        items, e.g. the stage's method)."""
        kwargs = fit_options(self.mesh)
        if self.out is not None:
            kwargs["checkpoint_dir"] = self.checkpoint_dir(name)
            kwargs["config"] = {**self.config, "stage": name, **config}
        return kwargs

    def write_results(self, results: Mapping[str, Any]) -> None:
        """Write ``results.json`` (atomically, on process 0): the run is finished."""
        if self.out is not None and is_primary():
            write_json_atomic(os.path.join(self.out, _RESULTS_FILE), results)


def open_run(
    config: Any, out: str | os.PathLike | None, *, restart: bool = False, mesh: str | None = None
) -> Run:
    """Open ``out`` (checked first, :func:`check_out`) as a resumable run of ``config``.

    A new ``out`` gets ``run.json``; an ``out`` holding this config's run resumes it (finished
    stages are read back, the others resume from their latest complete checkpoint); one
    holding another config is refused naming the fields (:func:`check_resume`). ``restart``
    deletes the previous run's ``run.json``, ``results.json``, stage markers and checkpoints
    first. Files are written by process 0; all processes wait for it.

    ``mesh``: ``"data=4,fsdp=2"`` or ``None`` (one device; in a multi-process run
    ``data=<all devices>``).
    """
    import shutil

    import jax

    if mesh is None and jax.process_count() > 1:
        mesh = f"data={jax.device_count()}"
    if out is None:
        return Run(None, config, mesh)
    path = check_out(out)
    if is_primary():
        if restart:
            for name in (_RUN_FILE, _RESULTS_FILE):
                if os.path.exists(os.path.join(path, name)):
                    os.remove(os.path.join(path, name))
            for name in (_STAGES, _CHECKPOINTS):
                shutil.rmtree(os.path.join(path, name), ignore_errors=True)
        check_resume(config, path)
        if not os.path.isfile(os.path.join(path, _RUN_FILE)):
            write_json_atomic(os.path.join(path, _RUN_FILE), {"config": _config_record(config)})
    _barrier("open_run")
    return Run(path, config, mesh)


def check_config(config: Any, config_type: type) -> None:
    """The first check of every experiment's ``run``: ``config`` is a ``config_type`` (else a
    ``TypeError`` naming the experiment, e.g. ``experiments.cram``), then ``config.validate()``.
    """
    if not isinstance(config, config_type):
        experiment = config_type.__module__.partition(".configs")[0]
        raise TypeError(f"config must be an {experiment} Config, got {type(config).__name__}")
    config.validate()


def experiment_run(
    config_type: type, *, check_mesh: Callable[[str | None], None] | None = None
) -> Callable[[Callable[[Any, Run], dict[str, Any]]], Callable[..., dict[str, Any]]]:
    """Decorator: an experiment's resumable body ``body(config, run)`` becomes its public
    ``run(config, out=None, *, mesh=None, restart=False)``, with ``body``'s docstring and name.

    ``run`` checks ``config`` (:func:`check_config`) and ``mesh`` (``check_mesh(mesh)``, the
    experiment's own limits, if any) before any work, opens ``out`` as a resumable run of
    ``config`` (:func:`open_run`: an ``out`` holding another config is refused, ``restart``
    starts over, ``mesh`` is the run's mesh; ``out=None`` writes nothing), and returns the
    finished run's ``results.json`` as it is (nothing is rerun), else ``body(config, run)``: the
    stages, which write ``results.json`` last (:meth:`Run.write_results`).
    """

    def decorate(body: Callable[[Any, Run], dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        def run(
            config: Any,
            out: str | os.PathLike | None = None,
            *,
            mesh: str | None = None,
            restart: bool = False,
        ) -> dict[str, Any]:
            check_config(config, config_type)
            if check_mesh is not None:
                check_mesh(mesh)
            resumed = open_run(config, out, restart=restart, mesh=mesh)
            if (finished := resumed.results()) is not None:
                return finished  # the run is done: not rerun
            return body(config, resumed)

        for name in ("__module__", "__name__", "__qualname__", "__doc__"):
            setattr(run, name, getattr(body, name))
        run.__annotations__ = {**run.__annotations__, "config": config_type}
        return run

    return decorate


def fit_options(mesh: str | None) -> dict[str, Any]:
    """``fit``'s ``mesh`` and ``param_sharding`` for ``--mesh``: FSDP when the mesh has an
    ``fsdp`` axis, else replicated params (data parallel); ``{}`` without a mesh."""
    if mesh is None:
        return {}
    fsdp = "fsdp" in parse_mesh(mesh, num_devices=math.inf)
    return {"mesh": mesh, "param_sharding": "fsdp" if fsdp else "replicated"}


def local_model(model: Any) -> Any:
    """Put every array of ``model`` on this process's default device (in place; returns it).

    After sharded training the model's arrays live on a mesh, across processes in a
    multi-process run; the one-shot pruning, recalibration and evaluation that follow run the
    same way on every process on a full local copy (``process_allgather`` when the arrays are
    not fully addressable)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def local(a: Any) -> Any:
        if not isinstance(a, jax.Array) or len(a.sharding.device_set) == 1:
            return a
        if a.is_fully_addressable:
            return jax.device_put(a, jax.local_devices()[0])
        from jax.experimental import multihost_utils

        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            data = multihost_utils.process_allgather(jax.random.key_data(a), tiled=True)
            return jax.random.wrap_key_data(jnp.asarray(data), impl=jax.random.key_impl(a))
        return jnp.asarray(multihost_utils.process_allgather(a, tiled=True))

    nnx.update(model, jax.tree.map(local, nnx.state(model)))
    return model


# --------------------------------------------------------------------------------------------
# Data, optimizer, one-shot pruning
# --------------------------------------------------------------------------------------------


def load_datasets(config: Any, sizes: dict[str, int] | None = None) -> tuple[Any, Any]:
    """Train and test datasets of ``config.dataset``, subsampled to ``config.train_subset`` and
    ``config.test_subset`` (``None``: all) with ``config.seed``.

    ``sizes``, when given, receives ``train``, ``test`` (the sizes used) and ``train_full``,
    ``test_full`` (the sizes of the splits) for :func:`run_header`.
    """
    from jaxcompress import data as jdata

    train_ds = jdata.load(config.dataset, "train", data_dir=config.data_dir)
    test_ds = jdata.load(config.dataset, "test", data_dir=config.data_dir)
    full = {"train_full": len(train_ds), "test_full": len(test_ds)}
    if config.train_subset is not None and config.train_subset < len(train_ds):
        train_ds = jdata.subset(train_ds, config.train_subset, seed=config.seed)
    if config.test_subset is not None and config.test_subset < len(test_ds):
        test_ds = jdata.subset(test_ds, config.test_subset, seed=config.seed)
    if sizes is not None:
        sizes.update(train=len(train_ds), test=len(test_ds), **full)
    return train_ds, test_ds


def prepare_run(config: Any, out: str | os.PathLike | None) -> tuple[Any, Any, Any, dict]:
    """The start of every experiment's ``run``: validate ``config``, check ``out`` (created,
    writable) before any data is loaded, load the datasets (:func:`load_datasets`) and check
    that ``config.batch_size`` fits the training set.

    Returns:
      ``(out, train_ds, test_ds, sizes)``: ``out`` as an absolute path (``None`` stays
      ``None``) and the ``sizes`` for :func:`run_header`.
    """
    config.validate()
    out = None if out is None else check_out(out)
    sizes: dict[str, int] = {}
    train_ds, test_ds = load_datasets(config, sizes)
    if config.batch_size > len(train_ds):
        raise ValueError(
            f"batch_size={config.batch_size} is larger than the training set ({len(train_ds)})"
        )
    return out, train_ds, test_ds, sizes


def fit_stage(model, tx, train_ds, config, /, *, desc: str, epochs: int | None = None, **kwargs):
    """:func:`jaxcompress.train.fit` for ``epochs`` (default ``config.epochs``) with one
    progress bar over the epochs (``desc``, when ``config.progress``) instead of ``fit``'s own,
    ``config.batch_size`` and ``config.eval_batch_size``; ``kwargs`` go to ``fit`` (a
    ``callback`` is called before the bar advances; what it adds to an epoch's record is
    checkpointed with it). A resumed run's bar starts at its restored epochs."""
    from jaxcompress import train as jtrain

    epochs = config.epochs if epochs is None else epochs
    callback = kwargs.pop("callback", None)
    with stage_bar(epochs, desc, config.progress) as bar:

        def advance(epoch, record, trained):
            if callback is not None:
                callback(epoch, record, trained)  # may add entries to the checkpointed record
            bar.update(epoch - bar.n)  # a resumed run starts past its restored epochs

        return jtrain.fit(
            model,
            tx,
            train_ds,
            epochs=epochs,
            batch_size=config.batch_size,
            eval_batch_size=config.eval_batch_size,
            progress=False,
            callback=advance,
            **kwargs,
        )


def train_sgd(
    model,
    train_ds,
    config,
    out: str | None,
    desc: str = "train (SGD)",
    *,
    run: Run | None = None,
    stage: str = "train",
):
    """Train ``model`` densely with :func:`make_sgd` over ``config.epochs`` (:func:`fit_stage`,
    seed ``config.seed``), logging to ``<out>/metrics.jsonl``; return the ``History``. With
    ``run`` (:func:`open_run`) the training is the resumable stage ``stage`` on ``run.mesh``."""
    total_steps = config.epochs * (len(train_ds) // config.batch_size)
    return fit_stage(
        model,
        make_sgd(config, total_steps),
        train_ds,
        config,
        desc=desc,
        seed=config.seed,
        metrics_path=None if out is None else os.path.join(out, "metrics.jsonl"),
        **({} if run is None else run.fit_kwargs(stage)),
    )


def build_model(config: Any, in_channels: int, num_classes: int, seed: int) -> Any:
    """A freshly initialised BatchNorm CNN: ``config.model`` in :data:`MODELS`,
    :class:`jaxcompress.models.SmallCNN` with ``config.widths``, or ResNet-8 with stem width
    ``config.widths[0]``."""
    from flax import nnx

    from jaxcompress.models import SmallCNN, resnet8

    rngs = nnx.Rngs(seed)
    if config.model == "resnet8":
        return resnet8(
            in_channels=in_channels, num_classes=num_classes, width=config.widths[0], rngs=rngs
        )
    return SmallCNN(in_channels, num_classes, config.widths, rngs=rngs)


def make_sgd(config: Any, total_steps: int) -> Any:
    r"""SGD as torch does it: :math:`d = g + \lambda\theta`, :math:`b \leftarrow \mu b + d`,
    :math:`\theta \leftarrow \theta - \eta_t b`, with :math:`\eta_t` a cosine decay from
    ``config.learning_rate`` to 0 over ``total_steps`` (Loshchilov & Hutter, 2017);
    :math:`\mu` = ``config.momentum``, :math:`\lambda` = ``config.weight_decay``; an
    ``optax.GradientTransformation``."""
    import optax

    schedule = optax.cosine_decay_schedule(config.learning_rate, decay_steps=total_steps)
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(schedule, momentum=config.momentum),
    )


def nm_selector(m: int) -> Callable[[Any, Any], bool]:
    """Prunable kernels whose contracting (input) dimension splits into groups of ``m``."""
    from jaxcompress import masks as jmasks

    def where(path, leaf) -> bool:
        return jmasks.prunable(path, leaf) and leaf.shape[-2] % m == 0

    return where


def prune_and_measure(model, dense_state, calib, test_ds, config, **criterion) -> dict:
    """Restore ``dense_state`` into ``model``, prune it with :func:`jaxcompress.prune.oneshot`
    (``criterion``), evaluate, recalibrate BatchNorm on ``calib`` (``config.calib_batches``,
    ``calib_momentum``, ``calib_mode``), evaluate again.

    Returns ``raw``/``bn_recalibrated`` accuracies and losses, the ``actual_sparsity`` of the
    pruned kernels and ``recalibration_seconds``.
    """
    from flax import nnx

    from jaxcompress import masks as jmasks
    from jaxcompress import prune
    from jaxcompress import train as jtrain

    nnx.update(model, dense_state)
    pruned, _ = prune.oneshot(nnx.state(model, nnx.Param), **criterion)
    nnx.update(model, pruned)
    where = criterion.get("where") or jmasks.prunable
    raw = jtrain.evaluate(model, test_ds, batch_size=config.eval_batch_size)
    start = time.perf_counter()
    prune.recalibrate_batchnorm(
        model,
        calib,
        num_batches=config.calib_batches,
        momentum=config.calib_momentum,
        mode=config.calib_mode,
    )
    calib_seconds = time.perf_counter() - start
    recal = jtrain.evaluate(model, test_ds, batch_size=config.eval_batch_size)
    return {
        "raw": raw["accuracy"],
        "bn_recalibrated": recal["accuracy"],
        "raw_loss": raw["loss"],
        "bn_recalibrated_loss": recal["loss"],
        "actual_sparsity": float(jmasks.summary(pruned, where=where).sparsity),
        "recalibration_seconds": calib_seconds,
    }


# --------------------------------------------------------------------------------------------
# Seeds and aggregation
# --------------------------------------------------------------------------------------------


def seed_list(config: Any) -> list[int]:
    """``[seed, seed + 1, ..., seed + num_seeds - 1]`` (one seed without ``num_seeds``)."""
    return [config.seed + k for k in range(getattr(config, "num_seeds", 1))]


def _reduce(records: list[Any], fn: Callable[[np.ndarray], Any], keep: tuple[str, ...]) -> Any:
    first = records[0]
    if isinstance(first, dict):
        return {
            k: first[k] if k in keep else _reduce([r[k] for r in records], fn, keep) for k in first
        }
    values = np.asarray(records, dtype=np.float64)
    reduced = fn(values)
    return reduced.tolist() if values.ndim > 1 else float(reduced)


def aggregate(
    records: list[Mapping[str, Any]], keep: tuple[str, ...] = ()
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Mean and sample standard deviation over seeds of same-shaped nested dicts.

    Leaves are numbers or equally long lists of numbers (reduced elementwise); keys in
    ``keep`` are copied from the first record instead. The standard deviation (``ddof=1``) is
    ``None`` for a single record.
    """
    if not records:
        raise ValueError("aggregate needs at least one record, got none")
    mean = _reduce(list(records), lambda v: v.mean(axis=0), keep)
    if len(records) == 1:
        return mean, None
    return mean, _reduce(list(records), lambda v: v.std(axis=0, ddof=1), keep)


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def run_header(config: Any, sizes: Mapping[str, int], seeds: Sequence[int], **extra: Any) -> str:
    """One line saying what was run: dataset, subsets, epochs, seeds (and ``extra`` items).

    E.g. ``mnist: train 6,000 of 60,000, test 2,000 of 10,000; 3 epochs; seeds 0, 1``.
    """

    def part(split: str) -> str:
        used, full = sizes.get(split), sizes.get(f"{split}_full")
        if used is None:
            return ""
        return f"{split} {used:,}" + ("" if full in (None, used) else f" of {full:,}")

    data = ", ".join(p for p in (part("train"), part("test")) if p)
    items = [f"{config.dataset}: {data}" if data else str(config.dataset)]
    epochs = getattr(config, "epochs", None)
    if epochs is not None:
        items.append(f"{epochs} epoch{'' if epochs == 1 else 's'}")
    items.append(f"seed{'' if len(seeds) == 1 else 's'} {', '.join(str(s) for s in seeds)}")
    items += [f"{k.replace('_', ' ')} {v}" for k, v in extra.items()]
    return "; ".join(items)


def stage_bar(total: int, desc: str, enabled: bool):
    """The one progress bar of a stage (``tqdm``; a no-op when ``enabled`` is False)."""
    from tqdm import tqdm

    enabled = enabled and is_primary()
    return tqdm(total=total, desc=desc, disable=not enabled, leave=True, dynamic_ncols=True)


def environment(**extra: Any) -> dict[str, Any]:
    """The machine and software of a run: jax version, backend, device kind and count, CPU
    count, Python, platform and load average (plus ``extra``)."""
    import jax

    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": list(os.getloadavg()),
        **extra,
    }


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically, creating its directory first: see
    :func:`jaxcompress.checkpoint.write_json_atomic` (temporary file in the same directory,
    fsync, ``os.replace``; the old file stays intact on any failure)."""
    from jaxcompress.checkpoint import write_json_atomic as write

    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    write(path, obj, indent=indent)


class ConfigBase:
    """Mixin of the experiments' frozen config dataclasses: :meth:`replace` with a clear error
    for a name that is not a field."""

    def replace(self, **changes: Any):
        """A copy with some fields changed."""
        names = {f.name for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(
                f"{type(self).__module__}.{type(self).__name__} has no field "
                f"{', '.join(map(repr, unknown))}; its fields are {', '.join(sorted(names))}"
            )
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def ablation_configs(ablations: Mapping[str, Any], configs: Mapping[str, Any]) -> dict[str, Any]:
    """The configs of an experiment's ablations, ``{"<ablation>/<variant>": config}``.

    Args:
      ablations: ``{name: {"base": "default" | "quick", "common": {field: value},
        "variants": {label: {field: value}}}}``, as :func:`read_ablations` reads
        ``configs/ablations.toml``.
      configs: ``{"default": module, "quick": module}``, each with ``get_config()``.

    Every config is validated, so an ablation that no longer fits its config fails here.
    """
    out = {}
    for name, ablation in ablations.items():
        base = configs[ablation["base"]].get_config().replace(**ablation.get("common", {}))
        for label, changes in ablation["variants"].items():
            out[f"{name}/{label}"] = base.replace(**changes).validate()
    return out


def _not_none(tp: Any) -> Any:
    """``X`` for the type ``X | None``, else ``tp``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        (tp,) = [a for a in args if a is not type(None)]
    return tp


def _from_toml(value: Any, tp: Any, where: str) -> Any:
    """``value`` (as :mod:`tomllib` reads it) as a value of the field type ``tp``: a TOML array
    becomes a tuple, an integer a float where ``tp`` is ``float``; ``X | None`` takes an ``X``
    (TOML has no null). Raises a ``TypeError`` naming ``where`` on any other value."""
    tp = _not_none(tp)
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and isinstance(value, list):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_toml(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) == len(args):
            return tuple(
                _from_toml(v, a, f"{where}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
    elif (tp is bool and isinstance(value, bool)) or (tp is str and isinstance(value, str)):
        return value
    elif tp is int and is_int(value):
        return value
    elif tp is float and is_real(value):
        return float(value)
    raise TypeError(f"{where} must be {_toml_type(tp)}, got {value!r}")


def _toml_type(tp: Any) -> str:
    """What a TOML value of the field type ``tp`` is, in words (for errors)."""
    tp = _not_none(tp)
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"an array of {_toml_type(args[0])}s"
        return f"an array of {len(args)} items ({', '.join(map(_toml_type, args))})"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return words.get(tp, repr(tp))


def _read_toml(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The TOML file ``path`` as a dict (a ``ValueError`` naming the file if it is not TOML)."""
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{os.fspath(path)}: not a TOML file of {what}: {e}") from None


def _overrides(config_type: type, data: Any, where: str) -> dict[str, Any]:
    """The TOML table ``data`` as field overrides of ``config_type`` (see :func:`read_overrides`);
    ``where`` is the prefix of a key in errors (``"<file>: "`` or ``"<file>: <table>."``)."""
    table = where.rstrip(": .")  # the file, or the file and the table
    if not isinstance(data, dict):
        raise TypeError(f"{table} must be a table of config fields, got {data!r}")
    hints = typing.get_type_hints(config_type)
    fields = [f.name for f in dataclasses.fields(config_type)]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise TypeError(
            f"{table}: {config_type.__module__}.{config_type.__name__} has no field "
            f"{', '.join(map(repr, unknown))}; its fields are {', '.join(sorted(fields))}"
        )
    return {key: _from_toml(value, hints[key], f"{where}{key}") for key, value in data.items()}


def read_overrides(config_type: type, path: str | os.PathLike) -> dict[str, Any]:
    """The field overrides of the config dataclass ``config_type`` in the TOML file ``path``
    (e.g. ``configs/quick.toml``): one ``field = value`` per line, each with a comment saying
    why.

    Values are converted to the field's type (arrays to tuples, integers to floats for a
    ``float`` field); ranges and choices are left to the config's ``validate()``. Raises a
    ``ValueError`` naming the file for a file that is not TOML, and a ``TypeError`` naming the
    file and the key for a key that is not a field or a value of the wrong type.
    """
    data = _read_toml(path, "config overrides")
    return _overrides(config_type, data, f"{os.fspath(path)}: ")


def read_ablations(config_type: type, path: str | os.PathLike) -> dict[str, Any]:
    """The ablations of an experiment in the TOML file ``path`` (``configs/ablations.toml``), in
    the form :func:`ablation_configs` takes.

    One table per ablation, each with a comment saying what it found (its history is in the
    experiment's ``RESULTS.md``): ``base`` (``"default"`` or ``"quick"``), ``common`` (field
    overrides of every variant, optional) and ``variants`` (a table of field overrides per
    variant label). The overrides are read as :func:`read_overrides` reads them; an error names
    the file and the key (e.g. ``rho.variants.0.05.rho``).
    """
    name = os.fspath(path)
    out = {}
    for ablation, table in _read_toml(path, "ablations").items():
        where = f"{name}: {ablation}"
        if not isinstance(table, dict) or set(table) - {"base", "common", "variants"}:
            raise TypeError(f"{where} must be a table of base, common and variants, got {table!r}")
        if table.get("base") not in ("default", "quick"):
            raise ValueError(
                f"{where}.base must be 'default' or 'quick', got {table.get('base')!r}"
            )
        variants = table.get("variants")
        if not isinstance(variants, dict) or not variants:
            raise TypeError(f"{where}.variants must be a table of variants, got {variants!r}")
        out[ablation] = {
            "base": table["base"],
            "common": _overrides(config_type, table.get("common", {}), f"{where}.common."),
            "variants": {
                label: _overrides(config_type, changes, f"{where}.variants.{label}.")
                for label, changes in variants.items()
            },
        }
    return out


def config_from_file(config_type: type, *paths: str | os.PathLike) -> Any:
    """``config_type`` with the overrides of the TOML files ``paths`` (:func:`read_overrides`),
    a later file's value replacing an earlier one's; an experiment's ``configs/quick.py`` is this
    for its ``quick.toml`` (after :data:`QUICK_RECALIBRATION_FILE` for ``oneshot`` and ``cram``).
    """
    overrides: dict[str, Any] = {}
    for path in paths:
        overrides.update(read_overrides(config_type, path))
    return config_type(**overrides)


@dataclasses.dataclass(frozen=True)
class DataConfig(ConfigBase):
    """The fields every image experiment has: data, seed, subsets, batch size, progress."""

    dataset: str = field("fashion_mnist", "data set", choices=DATASETS)
    data_dir: str | None = field(None, "data root (none: $JAXCOMPRESS_DATA_DIR)")
    seed: int = field(
        0, "seed of initialisation, shuffling, subsets and every draw (the first of num_seeds)"
    )
    train_subset: int | None = field(None, "train on a random subset of this size (none: all)")
    test_subset: int | None = field(None, "evaluate on a random subset of this size (none: all)")
    batch_size: int = field(128, "training batch size")
    progress: bool = field(True, "progress bars")

    def check_data(self) -> None:
        """Check the fields of :class:`DataConfig` (``ValueError``/``TypeError`` naming one)."""
        check_source(self, DATASETS)
        check_ints(self, ("seed",), minimum=0)
        check_ints(self, ("batch_size",))
        check_ints(self, ("train_subset", "test_subset"), optional=True)
        check_bools(self, ("progress",))


@dataclasses.dataclass(frozen=True)
class SGDConfig(DataConfig):
    """:class:`DataConfig` and the SmallCNN trained with :func:`make_sgd` (``oneshot``,
    ``cram``, ``acdc``); an experiment redeclares a field to change its default or help."""

    epochs: int = field(10, "training epochs")
    learning_rate: float = field(0.1, "peak SGD learning rate (cosine decay to 0)")
    momentum: float = field(0.9, "SGD heavy-ball momentum")
    weight_decay: float = field(5e-4, "coupled L2 weight decay added to the gradient (torch SGD)")
    widths: tuple[int, ...] = field(
        (32, 64, 128), "SmallCNN conv widths (resnet8: widths[0] is the stem width)"
    )
    eval_batch_size: int = field(1000, "evaluation batch size")

    def check_sgd(self) -> None:
        """Check the fields of :class:`SGDConfig` (``ValueError``/``TypeError`` naming one)."""
        self.check_data()
        check_ints(self, ("epochs", "eval_batch_size"))
        check_floats(
            self,
            (
                ("learning_rate", 0.0, math.inf),
                ("momentum", 0.0, 1.0),
                ("weight_decay", 0.0, math.inf),
            ),
        )
        if self.learning_rate == 0.0:
            raise ValueError("learning_rate must be > 0, got 0.0")
        check_widths(self)


@dataclasses.dataclass(frozen=True)
class RecalibrationConfig(SGDConfig):
    """:class:`SGDConfig` and the BatchNorm recalibration after one-shot pruning
    (:func:`prune_and_measure`; the CrAM reference's BNT: 100 batches of 128, EMA 0.1)."""

    calib_batches: int = field(100, "BatchNorm recalibration forward passes (the reference: 100)")
    calib_batch_size: int = field(128, "calibration batch size (the reference: 128)")
    calib_momentum: float = field(0.1, "EMA weight of each calibration batch (the reference: 0.1)")
    calib_mode: str = field(
        "ema", "BatchNorm statistics: EMA (the reference) or exact mean", choices=CALIBRATION_MODES
    )

    def check_recalibration(self) -> None:
        """Check the fields of :class:`RecalibrationConfig`."""
        self.check_sgd()
        check_calibration(self)
