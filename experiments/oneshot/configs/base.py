"""The configuration dataclass of the one-shot pruning experiment."""

from __future__ import annotations

import dataclasses

from experiments._common import (
    CALIBRATION_MODES,
    DATASETS,
    ConfigBase,
    check_floats,
    check_ints,
    check_source,
    check_widths,
    field,
    is_int,
    is_real,
)

# ``check_ints``, ``check_widths`` and ``is_real`` are imported from here by
# ``experiments.surrogate`` (rebuilt later); new code imports them from ``experiments._common``.
__all__ = ["Config", "check_ints", "check_widths", "is_real"]


@dataclasses.dataclass(frozen=True)
class Config(ConfigBase):
    """Every setting of one run; :meth:`validate` checks them all before any work."""

    dataset: str = field("fashion_mnist", "data set", choices=DATASETS)
    data_dir: str | None = field(None, "data root (none: $JAXCOMPRESS_DATA_DIR)")
    seed: int = field(0, "model initialisation, shuffling and calibration-subset seed")
    epochs: int = field(6, "training epochs")
    batch_size: int = field(128, "training batch size")
    learning_rate: float = field(0.1, "peak SGD learning rate (cosine decay to 0)")
    momentum: float = field(0.9, "SGD heavy-ball momentum")
    weight_decay: float = field(5e-4, "coupled L2 weight decay added to the gradient (torch SGD)")
    widths: tuple[int, ...] = field((32, 64, 128), "conv widths of jaxcompress.models.SmallCNN")
    train_subset: int | None = field(None, "train on a random subset of this size (none: all)")
    test_subset: int | None = field(None, "evaluate on a random subset of this size (none: all)")
    sparsities: tuple[float, ...] = field(
        (0.5, 0.7, 0.8, 0.9, 0.95), "global magnitude sparsities to prune at"
    )
    nm: tuple[int, int] | None = field((2, 4), "N:M pattern of the N:M pruning (none: skip it)")
    calib_batches: int = field(100, "BatchNorm recalibration forward passes")
    calib_batch_size: int = field(128, "calibration batch size")
    calib_momentum: float = field(0.1, "EMA weight of each calibration batch (torch convention)")
    calib_mode: str = field(
        "ema", "BatchNorm statistics: EMA or exact (cumulative) mean", choices=CALIBRATION_MODES
    )
    eval_batch_size: int = field(1000, "evaluation batch size")
    progress: bool = field(True, "progress bars")

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
        if self.learning_rate == 0.0:
            raise ValueError("learning_rate must be > 0, got 0.0")
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
        if not isinstance(self.progress, bool):
            raise TypeError(f"progress must be a bool, got {self.progress!r}")
        return self
