"""The configuration dataclass of the CrAM experiment."""

from __future__ import annotations

import dataclasses

from experiments._common import (
    CALIBRATION_MODES,
    DATASETS,
    ConfigBase,
    check_bools,
    check_choices,
    check_ints,
    check_source,
    check_widths,
    field,
    is_int,
    is_real,
)

MODELS = ("small_cnn", "resnet8")
METHODS = ("sgd", "cram", "cram_nm")


@dataclasses.dataclass(frozen=True)
class Config(ConfigBase):
    """Every setting of one run; :meth:`validate` checks them all before any work.

    Training is the same for every method; only the optimizer differs. CrAM+ keeps the
    reference's defaults (``plus=True``, ``sparse_grad=True``, no gradient normalisation).
    The one-shot evaluation prunes every trained model (global magnitude at ``sparsities``,
    N:M at ``nm_patterns``) and recalibrates BatchNorm as the reference's BNT. Kernels whose
    contracting dimension is not divisible by every ``m`` of ``nm_patterns`` (e.g. a first
    conv with one input channel) stay dense in CrAM+N:M training and N:M pruning.
    """

    dataset: str = field("fashion_mnist", "data set", choices=DATASETS)
    data_dir: str | None = field(None, "data root (none: $JAXCOMPRESS_DATA_DIR)")
    seed: int = field(0, "first seed: initialisation, shuffling, CrAM draws, calibration subset")
    num_seeds: int = field(
        1,
        "repetitions with seeds seed, seed+1, ...: mean (and std) over seeds",
        aliases=("--seeds",),
    )
    epochs: int = field(10, "training epochs of every method")
    batch_size: int = field(128, "training batch size")
    learning_rate: float = field(0.05, "peak SGD learning rate (cosine decay to 0)")
    momentum: float = field(0.9, "SGD heavy-ball momentum")
    weight_decay: float = field(5e-4, "coupled L2 weight decay (torch SGD, the CrAM reference)")
    model: str = field("small_cnn", "BatchNorm CNN to train", choices=MODELS)
    widths: tuple[int, ...] = field(
        (32, 64, 128), "SmallCNN conv widths (resnet8: widths[0] is the stem width)"
    )
    train_subset: int | None = field(None, "train on a random subset of this size (none: all)")
    test_subset: int | None = field(None, "evaluate on a random subset of this size (none: all)")
    methods: tuple[str, ...] = field(
        METHODS,
        "models to train: sgd (dense baseline), cram (CrAM+Multi, global magnitude), "
        "cram_nm (CrAM+N:M)",
        choices=METHODS,
    )
    rho: float = field(
        0.1, "CrAM perturbation radius (the reference: 0.05 ImageNet, 0.15-0.2 CIFAR-10)"
    )
    cram_sparsities: tuple[float, ...] = field(
        (0.5, 0.7, 0.9), "sparsities CrAM+Multi draws from at every step"
    )
    sparsities: tuple[float, ...] = field(
        (0.5, 0.6, 0.7, 0.8, 0.9, 0.95), "global magnitude sparsities of the one-shot sweep"
    )
    nm_patterns: tuple[tuple[int, int], ...] = field(
        ((2, 4), (4, 8)), "N:M patterns of CrAM+N:M training and of the one-shot N:M pruning"
    )
    calib_batches: int = field(100, "BatchNorm recalibration forward passes (the reference: 100)")
    calib_batch_size: int = field(128, "calibration batch size (the reference: 128)")
    calib_momentum: float = field(0.1, "EMA weight of each calibration batch (the reference: 0.1)")
    calib_mode: str = field(
        "ema", "BatchNorm statistics: EMA (the reference) or exact mean", choices=CALIBRATION_MODES
    )
    eval_batch_size: int = field(1000, "evaluation batch size")
    progress: bool = field(True, "progress bars")

    def validate(self) -> Config:
        """Raise ``ValueError``/``TypeError`` naming the first bad field; return ``self``."""
        check_source(self, DATASETS)
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        check_ints(self, ("seed",), minimum=0)
        check_ints(
            self,
            (
                "num_seeds",
                "epochs",
                "batch_size",
                "calib_batches",
                "calib_batch_size",
                "eval_batch_size",
            ),
        )
        check_ints(self, ("train_subset", "test_subset"), optional=True)
        for name, lo, hi in (
            ("learning_rate", 0.0, float("inf")),
            ("momentum", 0.0, 1.0),
            ("weight_decay", 0.0, float("inf")),
            ("rho", 0.0, float("inf")),
        ):
            value = getattr(self, name)
            if not is_real(value) or not lo <= value < hi:
                raise ValueError(f"{name} must be a float in [{lo}, {hi}), got {value!r}")
        if self.learning_rate == 0.0:
            raise ValueError("learning_rate must be > 0, got 0.0")
        if not is_real(self.calib_momentum) or not 0.0 < self.calib_momentum <= 1.0:
            raise ValueError(f"calib_momentum must be in (0, 1], got {self.calib_momentum!r}")
        if self.calib_mode not in CALIBRATION_MODES:
            raise ValueError(
                f"calib_mode must be one of {CALIBRATION_MODES}, got {self.calib_mode!r}"
            )
        check_widths(self)
        check_choices(self, "methods", METHODS)
        check_bools(self, ("progress",))
        for name in ("sparsities", "cram_sparsities"):
            value = getattr(self, name)
            if (
                not isinstance(value, tuple)
                or not value
                or not all(is_real(s) and 0.0 <= s < 1.0 for s in value)
            ):
                raise ValueError(
                    f"{name} must be a non-empty tuple of floats in [0, 1), got {value!r}"
                )
            if len(set(value)) != len(value):
                raise ValueError(f"{name} must be distinct, got {value!r}")
        if (
            not isinstance(self.nm_patterns, tuple)
            or not self.nm_patterns
            or not all(
                isinstance(p, tuple)
                and len(p) == 2
                and all(is_int(v) for v in p)
                and 0 < p[0] < p[1]
                for p in self.nm_patterns
            )
        ):
            raise ValueError(
                "nm_patterns must be a non-empty tuple of (n, m) int pairs with 0 < n < m, "
                f"got {self.nm_patterns!r}"
            )
        if len(set(self.nm_patterns)) != len(self.nm_patterns):
            raise ValueError(f"nm_patterns must be distinct, got {self.nm_patterns!r}")
        return self
