"""What the experiments share: config fields and checks, data, the SGD every experiment trains
with, one-shot pruning with BatchNorm recalibration, seeds and their aggregation, the run
header, the environment record, atomic result files and the checks of ``--out`` and
``--mesh``.

Each experiment's ``train.py`` holds only its own pipeline; its ``configs/base.py`` declares its
fields with :func:`field` (default, type and help in one place), from which ``experiments.cli``
generates the command line.

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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "CALIBRATION_MODES",
    "ConfigBase",
    "DATASETS",
    "MESH_AXES",
    "ablation_configs",
    "aggregate",
    "check_bools",
    "check_choices",
    "check_floats",
    "check_ints",
    "check_out",
    "check_source",
    "check_widths",
    "environment",
    "field",
    "is_int",
    "is_real",
    "load_datasets",
    "make_sgd",
    "nm_selector",
    "parse_mesh",
    "prune_and_measure",
    "run_header",
    "seed_list",
    "stage_bar",
    "write_json_atomic",
]

DATASETS = ("fashion_mnist", "mnist", "digits")
CALIBRATION_MODES = ("ema", "cumulative")
#: Mesh axis names ``--mesh`` accepts: data parallelism and fully sharded data parallelism.
MESH_AXES = ("data", "fsdp")


# --------------------------------------------------------------------------------------------
# Config fields and their checks
# --------------------------------------------------------------------------------------------


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
    if config.data_dir is not None and not isinstance(config.data_dir, str):
        raise TypeError(f"data_dir must be a str path or None, got {config.data_dir!r}")


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
        "variants": {label: {field: value}}}}``, as in ``configs/ablations.py``.
      configs: ``{"default": module, "quick": module}``, each with ``get_config()``.

    Every config is validated, so an ablation that no longer fits its config fails here.
    """
    out = {}
    for name, ablation in ablations.items():
        base = configs[ablation["base"]].get_config().replace(**ablation.get("common", {}))
        for label, changes in ablation["variants"].items():
            out[f"{name}/{label}"] = base.replace(**changes).validate()
    return out
