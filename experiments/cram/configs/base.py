"""The configuration dataclass of the CrAM experiment."""

from __future__ import annotations

import dataclasses

from experiments.oneshot.configs.base import (
    CALIBRATION_MODES,
    DATASETS,
    check_ints,
    check_source,
    check_widths,
    is_int,
    is_real,
)

MODELS = ("small_cnn", "resnet8")
METHODS = ("sgd", "cram", "cram_nm")


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of one run; :meth:`validate` checks them all before any work.

    Training (the same for every method; only the optimizer differs):

    Attributes:
      dataset: ``fashion_mnist``, ``mnist`` or ``digits``.
      data_dir: data root (default ``$JAXCOMPRESS_DATA_DIR``).
      seed: first seed (model initialisation, shuffling, CrAM draws, calibration subset).
      num_seeds: independent repetitions with seeds ``seed, seed + 1, ...``; results report the
        mean over seeds (and the sample standard deviation when ``num_seeds > 1``).
      epochs: training epochs of every method.
      batch_size: training batch size.
      learning_rate: peak SGD learning rate :math:`\\eta_0` (cosine decay to 0 over all steps).
      momentum: SGD heavy-ball momentum.
      weight_decay: coupled L2 weight decay added to the gradient (as torch SGD, and the
        CrAM reference).
      model: ``small_cnn`` (:class:`jaxcompress.models.SmallCNN`, BatchNorm) or ``resnet8``.
      widths: conv widths of the SmallCNN; for ``resnet8`` ``widths[0]`` is the stem width.
      train_subset: train on a random subset of this size (``None``: all).
      test_subset: evaluate on a random test subset of this size (``None``: all).
      methods: which models to train: ``sgd`` (dense baseline), ``cram`` (CrAM+Multi, global
        magnitude, sparsities drawn from ``cram_sparsities``), ``cram_nm`` (CrAM+ N:M, pattern
        drawn from ``nm_patterns``).
      rho: CrAM perturbation radius :math:`\\rho` (no gradient normalisation, as the reference,
        which uses 0.05 on ImageNet and 0.15-0.2 on CIFAR-10). Ablation, CrAM+Multi,
        ``--quick --epochs 3 --methods cram --rho R`` (one seed, 2000 test images, so about
        +-0.9 points of sampling noise), dense / 80% / 90% / 95% accuracy after one-shot + BNT:
        0.05: 79.95 / 78.05 / 77.90 / 73.35; 0.1: 79.80 / 77.35 / 78.45 / 73.25;
        0.2: 79.25 / 77.70 / 76.75 / 73.15; 0.4: 78.25 / 78.15 / 76.35 / 74.00. No value is
        clearly better in that range; 0.1 is kept as the default.
      cram_sparsities: sparsities of the CrAM+Multi compressor.

    One-shot evaluation (every trained model):

    Attributes:
      sparsities: global magnitude sparsities to prune at.
      nm_patterns: ``(n, m)`` patterns: the CrAM+N:M training patterns and the one-shot N:M
        pruning patterns. Kernels whose contracting dimension is not divisible by every ``m``
        (e.g. a first conv with one input channel) stay dense in both.
      calib_batches: BatchNorm recalibration forward passes (the reference BNT: 100).
      calib_batch_size: calibration batch size (the reference: 128).
      calib_momentum: EMA weight of each new batch (PyTorch convention; the reference: 0.1).
      calib_mode: ``ema`` (the reference) or ``cumulative`` (exact mean; fewer batches suffice).
      eval_batch_size: evaluation batch size.
      progress: show progress bars.
    """

    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    seed: int = 0
    num_seeds: int = 1
    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    model: str = "small_cnn"
    widths: tuple[int, ...] = (32, 64, 128)
    train_subset: int | None = None
    test_subset: int | None = None
    methods: tuple[str, ...] = METHODS
    rho: float = 0.1
    cram_sparsities: tuple[float, ...] = (0.5, 0.7, 0.9)
    sparsities: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    nm_patterns: tuple[tuple[int, int], ...] = ((2, 4), (4, 8))
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
        if (
            not isinstance(self.methods, tuple)
            or not self.methods
            or not all(m in METHODS for m in self.methods)
            or len(set(self.methods)) != len(self.methods)
        ):
            raise ValueError(
                f"methods must be a non-empty tuple of distinct names from {METHODS}, "
                f"got {self.methods!r}"
            )
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
