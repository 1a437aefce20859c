"""The configuration dataclass of the latency-surrogate experiment.

Fields left ``None`` take the task's own default from :data:`TASK_DEFAULTS`, so one config
drives the four studies; :meth:`Config.task` resolves them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from experiments._common import (
    ConfigBase,
    check_bools,
    check_choices,
    check_ints,
    check_path,
    field,
    is_real,
)

__all__ = ["DATASETS", "TASKS", "TASK_DEFAULTS", "Config", "TaskSettings"]

TASKS = ("cnn", "resnet20", "sst2", "mlp")
DATASETS = ("fashion_mnist", "mnist", "digits")


@dataclasses.dataclass(frozen=True)
class TaskSettings:
    """The per-task fields of a :class:`Config` with its ``None`` resolved."""

    dataset: str
    epochs: int
    finetune_epochs: int
    learning_rate: float
    targets: tuple[float, ...]
    multipliers: tuple[float, ...]
    lam0: float
    gain: float


#: The width multipliers of the CNNs' uniform-width baselines.
_QUARTERS = (0.25, 0.5, 0.75, 1.0)

#: Each task's defaults for the fields a config leaves ``None``, one row per task in the order of
#: :class:`TaskSettings`' fields. ``gain`` is per epoch: the controller multiplies lambda by at
#: most ``exp(gain * relative FLOPs error)`` per epoch.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    task: dict(zip([f.name for f in dataclasses.fields(TaskSettings)], row, strict=True))
    for task, row in {
        # task: (dataset, epochs, finetune_epochs, learning_rate, targets, multipliers, lam0, gain)
        "cnn": ("fashion_mnist", 8, 2, 3e-3, (0.5, 0.42, 0.35, 0.2), _QUARTERS, 0.01, 2.0),
        "resnet20": ("fashion_mnist", 8, 2, 3e-3, (0.5, 0.35, 0.2), _QUARTERS, 0.01, 2.0),
        "sst2": ("sst2", 2, 1, 1e-3, (0.5, 0.3, 0.2), (1.0,), 0.1, 5.0),
        "mlp": ("mnist", 6, 2, 1e-3, (0.4, 0.25, 0.15), (1.0,), 0.1, 2.0),
    }.items()
}


@dataclasses.dataclass(frozen=True)
class Config(ConfigBase):
    """Every setting of one run; :meth:`validate` checks them all before any work.

    FLOPs targets are fractions of the full-width model's multiply-adds. Every model of a task
    gets the same epoch budget: uniform widths train all of it, a gated run trains
    ``epochs - finetune_epochs`` with the penalty and the rest after extraction (the MLP: its
    dense model trains ``epochs``, then each compressed model another ``epochs``).
    """

    tasks: tuple[str, ...] = field(TASKS, "studies to run", choices=TASKS)
    dataset: str | None = field(
        None,
        "image data of cnn, resnet20 and mlp (none: fashion_mnist for the CNNs, mnist for mlp)",
        choices=DATASETS,
    )
    data_dir: str | None = field(None, "data root (none: $JAXCOMPRESS_DATA_DIR)")
    seed: int = field(0, "first seed (initialisation, shuffling, subsets)")
    num_seeds: int = field(1, "seeds seed, seed + 1, ... (mean and std)", aliases=("--seeds",))
    epochs: int | None = field(None, "epoch budget of every model (none: the task's)")
    finetune_epochs: int | None = field(
        None, "epochs after extraction, within the budget (none: the task's)"
    )
    train_subset: int | None = field(None, "random training subset (none: all)")
    test_subset: int | None = field(None, "random test subset (none: all)")
    width: float = field(1.0, "width multiplier of every task's full model")
    targets: tuple[float, ...] | None = field(
        None, "FLOPs targets, fractions of the full model (none: the task's)"
    )
    multipliers: tuple[float, ...] | None = field(
        None, "uniform-width baselines, with 1.0 the reference (none: the task's)"
    )
    learning_rate: float | None = field(None, "peak Adam learning rate (none: the task's)")
    batch_size: int = field(128, "training batch size")
    gate_init: float = field(0.1, "initial gate value (Adam needs ~gate_init/lr steps to zero one)")
    p: float = field(2.0, "exponent of the surrogate width r = (|a|_1 / |a|_2)^p")
    tau: float = field(1e-2, "extraction threshold relative to the group's largest gate")
    lam0: float | None = field(None, "initial lambda of the l1/l2 runs (none: the task's)")
    gain: float | None = field(None, "lambda controller gain per epoch (none: the task's)")
    l1_lam0: float = field(1e-3, "initial lambda of the l1 baseline")
    normalize: bool = field(
        True, "l1/l2 runs divide the gates that no norm layer follows by their rms"
    )
    l1: bool = field(True, "also run the l1 baseline (network slimming) on cnn, resnet20, sst2")
    hold: bool = field(
        True, "penalise only while the kept units cost more than the target (no overshoot)"
    )
    latency_repeats: int = field(30, "timed forward passes per model and round (median)")
    progress: bool = field(True, "progress bars")

    def task(self, name: str) -> TaskSettings:
        """The settings of task ``name`` (``None`` fields from :data:`TASK_DEFAULTS`)."""
        if name not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {name!r}")
        values = dict(TASK_DEFAULTS[name])
        for key in values:
            mine = getattr(self, key)
            if mine is not None and not (key == "dataset" and name == "sst2"):
                values[key] = mine
        if name == "sst2" or 1.0 in values["multipliers"]:
            values["multipliers"] = tuple(sorted({1.0, *values["multipliers"]}))
        return TaskSettings(**values)

    def validate(self) -> Config:
        """Raise ``ValueError``/``TypeError`` naming the first bad field; return ``self``."""
        check_choices(self, "tasks", TASKS)
        if self.dataset is not None and self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS} or None, got {self.dataset!r}")
        check_path(self, "data_dir")
        check_bools(self, ("l1", "normalize", "hold", "progress"))
        check_ints(self, ("seed",), minimum=0)
        check_ints(
            self,
            ("num_seeds", "batch_size", "latency_repeats"),
        )
        check_ints(self, ("epochs", "train_subset", "test_subset"), optional=True)
        check_ints(self, ("finetune_epochs",), minimum=0, optional=True)
        for name in ("width", "gate_init", "p", "l1_lam0"):
            _positive(self, name)
        for name in ("learning_rate", "lam0", "gain"):
            if getattr(self, name) is not None:
                _positive(self, name)
        if not is_real(self.tau) or not 0.0 <= self.tau < 1.0:
            raise ValueError(f"tau must be a float in [0, 1), got {self.tau!r}")
        if self.targets is not None:
            _fractions(self.targets, "targets", upper=False)
        if self.multipliers is not None:
            _fractions(self.multipliers, "multipliers", upper=True)
            if 1.0 not in self.multipliers:
                raise ValueError(
                    f"multipliers must contain 1.0 (the full-width reference), got "
                    f"{self.multipliers!r}"
                )
        for name in self.tasks:
            settings = self.task(name)
            if settings.finetune_epochs >= settings.epochs:
                raise ValueError(
                    f"finetune_epochs must be < epochs (the penalty phase needs at least one "
                    f"epoch), got finetune_epochs={settings.finetune_epochs} and "
                    f"epochs={settings.epochs} for task {name!r}"
                )
            if settings.lam0 > LAM_MAX or self.l1_lam0 > LAM_MAX:
                raise ValueError(f"lam0 and l1_lam0 must be <= {LAM_MAX}, got {settings.lam0!r}")
        return self


#: Upper clip of lambda.
LAM_MAX = 1e3


def _positive(config: Config, name: str) -> None:
    value = getattr(config, name)
    if not is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")


def _fractions(value: Any, name: str, *, upper: bool) -> None:
    bound = "(0, 1]" if upper else "(0, 1)"
    if (
        not isinstance(value, tuple)
        or not value
        or not all(is_real(v) and 0.0 < v and (v <= 1.0 if upper else v < 1.0) for v in value)
    ):
        raise ValueError(f"{name} must be a non-empty tuple of floats in {bound}, got {value!r}")
    if len({float(v) for v in value}) != len(value):
        raise ValueError(f"{name} must be distinct, got {value!r}")
