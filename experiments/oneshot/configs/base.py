"""The configuration dataclass of the one-shot pruning experiment."""

from __future__ import annotations

import dataclasses
import numbers

DATASETS = ("fashion_mnist", "mnist", "digits")
CALIBRATION_MODES = ("ema", "cumulative")


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of one run; :meth:`validate` checks them all before any work.

    Attributes:
      dataset: ``fashion_mnist``, ``mnist`` or ``digits``.
      data_dir: data root (default ``$JAXCOMPRESS_DATA_DIR``).
      seed: model initialisation, shuffling and calibration-subset seed.
      epochs: training epochs.
      batch_size: training batch size.
      learning_rate: peak SGD learning rate (cosine decay to 0 over all steps).
      momentum: SGD (heavy-ball) momentum.
      weight_decay: coupled L2 weight decay added to the gradient (as torch SGD).
      widths: conv widths of :class:`jaxcompress.models.SmallCNN`.
      train_subset: train on a random subset of this size (``None``: all).
      test_subset: evaluate on a random test subset of this size (``None``: all).
      sparsities: global magnitude sparsities to prune at.
      nm: ``(n, m)`` of the N:M pruning, or ``None`` to skip it.
      calib_batches: BatchNorm recalibration forward passes.
      calib_batch_size: calibration batch size.
      calib_momentum: EMA weight of each new batch (PyTorch convention; CrAM uses 0.1).
      calib_mode: ``ema`` or ``cumulative``.
      eval_batch_size: evaluation batch size.
      progress: show progress bars.
    """

    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    seed: int = 0
    epochs: int = 6
    batch_size: int = 128
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    widths: tuple[int, ...] = (32, 64, 128)
    train_subset: int | None = None
    test_subset: int | None = None
    sparsities: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95)
    nm: tuple[int, int] | None = (2, 4)
    calib_batches: int = 100
    calib_batch_size: int = 128
    calib_momentum: float = 0.1
    calib_mode: str = "ema"
    eval_batch_size: int = 1000
    progress: bool = True

    def replace(self, **changes) -> Config:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def validate(self) -> Config:
        """Raise ``ValueError``/``TypeError`` naming the first bad field; return ``self``."""
        check_source(self, DATASETS)
        check_ints(self, ("seed",), minimum=0)
        check_ints(
            self, ("epochs", "batch_size", "calib_batches", "calib_batch_size", "eval_batch_size")
        )
        check_ints(self, ("train_subset", "test_subset"), optional=True)
        check_floats(
            self,
            (
                ("learning_rate", 0.0, float("inf")),
                ("momentum", 0.0, 1.0),
                ("weight_decay", 0.0, float("inf")),
            ),
        )
        if not is_real(self.calib_momentum) or not 0.0 < self.calib_momentum <= 1.0:
            raise ValueError(f"calib_momentum must be in (0, 1], got {self.calib_momentum!r}")
        if self.calib_mode not in CALIBRATION_MODES:
            raise ValueError(
                f"calib_mode must be one of {CALIBRATION_MODES}, got {self.calib_mode!r}"
            )
        check_widths(self)
        if not isinstance(self.sparsities, tuple) or not all(
            is_real(s) and 0.0 <= s < 1.0 for s in self.sparsities
        ):
            raise ValueError(
                f"sparsities must be a tuple of floats in [0, 1), got {self.sparsities!r}"
            )
        if len(set(self.sparsities)) != len(self.sparsities):
            raise ValueError(f"sparsities must be distinct, got {self.sparsities!r}")
        if self.nm is not None and (
            not isinstance(self.nm, tuple)
            or len(self.nm) != 2
            or not all(is_int(v) for v in self.nm)
            or not 0 < self.nm[0] < self.nm[1]
        ):
            raise ValueError(f"nm must be None or a pair (n, m) with 0 < n < m, got {self.nm!r}")
        return self


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# Field checks shared by the experiments' ``Config.validate`` methods. Each raises a
# ``ValueError`` (``TypeError`` for ``data_dir``) naming the field, the value and what was
# expected.


def check_source(config, datasets: tuple[str, ...]) -> None:
    """``config.dataset`` in ``datasets``; ``config.data_dir`` a str path or None."""
    if config.dataset not in datasets:
        raise ValueError(f"dataset must be one of {datasets}, got {config.dataset!r}")
    if config.data_dir is not None and not isinstance(config.data_dir, str):
        raise TypeError(f"data_dir must be a str path or None, got {config.data_dir!r}")


def check_ints(config, names, *, minimum: int = 1, optional: bool = False) -> None:
    """Every field in ``names`` an int >= ``minimum`` (1 or 0), or None with ``optional``."""
    what = {1: "a positive int", 0: "a non-negative int"}.get(minimum, f"an int >= {minimum}")
    for name in names:
        value = getattr(config, name)
        if optional and value is None:
            continue
        if not is_int(value) or value < minimum:
            suffix = " or None" if optional else ""
            raise ValueError(f"{name} must be {what}{suffix}, got {value!r}")


def check_floats(config, ranges) -> None:
    """Every ``(name, lo, hi)`` field a real number in ``[lo, hi)``."""
    for name, lo, hi in ranges:
        value = getattr(config, name)
        if not is_real(value) or not lo <= value < hi:
            raise ValueError(f"{name} must be a float in [{lo}, {hi}), got {value!r}")


def check_widths(config, name: str = "widths") -> None:
    """A non-empty tuple of positive ints."""
    value = getattr(config, name)
    if not isinstance(value, tuple) or not value or not all(is_int(w) and w > 0 for w in value):
        raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {value!r}")
