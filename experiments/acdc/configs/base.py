"""The configuration dataclass of the AC/DC experiment."""

from __future__ import annotations

import dataclasses
import math

from experiments.oneshot.configs.base import (
    DATASETS,
    check_floats,
    check_ints,
    check_source,
    check_widths,
    is_int,
    is_real,
)

MODELS = ("small_cnn", "resnet8")


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of one run; :meth:`validate` checks them all before any work.

    Training (the same for every method; only the optimizer wrapper differs):

    Attributes:
      dataset: ``fashion_mnist``, ``mnist`` or ``digits``.
      data_dir: data root (default ``$JAXCOMPRESS_DATA_DIR``).
      seed: first seed (model initialisation, shuffling, subsets, label noise).
      num_seeds: repetitions with seeds ``seed, seed + 1, ...``; results report the mean over
        seeds and the sample standard deviation (``num_seeds > 1``).
      epochs: the epoch budget :math:`E` of every method.
      batch_size: training batch size.
      learning_rate: peak SGD learning rate of the reference ``CosineLR``.
      lr_warmup_epochs: linear learning-rate warm-up epochs :math:`w` of ``CosineLR``.
      momentum: SGD heavy-ball momentum.
      weight_decay: coupled L2 weight decay added to the gradient (torch SGD, the reference).
      model: ``small_cnn`` (:class:`jaxcompress.models.SmallCNN`, BatchNorm) or ``resnet8``.
      widths: conv widths of the SmallCNN; for ``resnet8`` ``widths[0]`` is the stem width.
      train_subset: train on a random subset of this size (``None``: all).
      test_subset: evaluate on a random test subset of this size (``None``: all).
      sparsities: target sparsities (global magnitude over conv/dense kernels) of AC/DC, GMP
        and one-shot + fine-tuning.

    AC/DC timeline, in epochs (``None``: derived from ``epochs``, see :meth:`phase_epochs`):

    Attributes:
      warmup_epochs: dense warm-up :math:`W` (default ``round(0.1 E)``, at least 1).
      compressed_epochs: length :math:`C` of each compressed phase before the final one
        (default ``round(0.1 E)``, at least 1).
      decompressed_epochs: length :math:`D` of each decompressed phase (default :math:`C`).
      final_compressed_epochs: the final compressed phase :math:`L` (default
        ``round(0.2 E)``, at least 1). GMP ramps its sparsity from epoch :math:`W` to
        :math:`E - L` and then trains the fixed support for :math:`L` epochs; one-shot
        pruning takes the dense run at epoch :math:`E - L` and fine-tunes it for :math:`L`.

    Memorisation (AC/DC vs dense with a fraction of the training labels randomised):

    Attributes:
      memorisation: run it.
      memorisation_fraction: fraction of the training examples given a random wrong label.
      memorisation_sparsity: AC/DC sparsity of the memorisation run.
      memorisation_subset: train the memorisation runs on a random subset of this size
        (``None``: the whole training set). Fewer examples are memorised in fewer epochs: with
        2,000 Fashion-MNIST examples (200 random labels) a dense SmallCNN fits most random
        labels within 30 epochs, with 10,000 it fits almost none within 20.
      memorisation_epochs: epoch budget of the memorisation runs (``None``: ``epochs``); their
        AC/DC phases follow :meth:`phase_epochs` at this budget (:meth:`memorisation_config`).
        The reference trains 200 epochs with 20-epoch phases; random labels are fitted late,
        so a longer run on the small subset shows several compressed/decompressed cycles
        after memorisation has started, at a small cost (2,000 examples are 16 steps).
        Measured on Fashion-MNIST with the default SmallCNN: at 90% sparsity the sparse model
        still re-fits all 200 random labels within a compressed phase, at 95% it cannot, so
        the default ``memorisation_sparsity`` is 0.95 (see ``experiments/acdc/RESULTS.md``).
      memorisation_only: run only the memorisation runs (``results.json`` then holds
        ``memorisation``, ``config``, ``timing`` and ``environment``).

    Attributes:
      eval_batch_size: evaluation batch size.
      progress: show progress bars.
    """

    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    seed: int = 0
    num_seeds: int = 1
    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 0.1
    lr_warmup_epochs: int = 1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    model: str = "small_cnn"
    widths: tuple[int, ...] = (32, 64, 128)
    train_subset: int | None = None
    test_subset: int | None = None
    sparsities: tuple[float, ...] = (0.9, 0.95)
    warmup_epochs: int | None = None
    compressed_epochs: int | None = None
    decompressed_epochs: int | None = None
    final_compressed_epochs: int | None = None
    memorisation: bool = True
    memorisation_fraction: float = 0.1
    memorisation_sparsity: float = 0.95
    memorisation_subset: int | None = 2_000
    memorisation_epochs: int | None = 60
    memorisation_only: bool = False
    eval_batch_size: int = 1000
    progress: bool = True

    def replace(self, **changes) -> Config:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def memorisation_config(self) -> Config:
        """The configuration of the memorisation runs: ``epochs = memorisation_epochs``."""
        if self.memorisation_epochs is None:
            return self
        return self.replace(epochs=self.memorisation_epochs)

    def phase_epochs(self) -> tuple[int, int, int, int]:
        """``(W, C, D, L)``: warm-up, compressed, decompressed and final compressed epochs.

        Unset fields follow the paper's proportions (10 dense warm-up epochs, 5-epoch phases
        and a 15-epoch final phase out of 100 on ImageNet), scaled to ``epochs``:
        :math:`W = C = D = \\max(1, \\mathrm{round}(E/10))`, :math:`L = \\max(1,
        \\mathrm{round}(E/5))`. The last decompressed phase absorbs
        :math:`(E - L - W) \\bmod (C + D)` extra epochs (:class:`jaxcompress.optim.AcdcSchedule`).
        """
        tenth = max(1, round(self.epochs / 10))
        w = tenth if self.warmup_epochs is None else self.warmup_epochs
        c = tenth if self.compressed_epochs is None else self.compressed_epochs
        d = c if self.decompressed_epochs is None else self.decompressed_epochs
        final = (
            max(1, round(self.epochs / 5))
            if self.final_compressed_epochs is None
            else self.final_compressed_epochs
        )
        return w, c, d, final

    def validate(self) -> Config:
        """Raise ``ValueError``/``TypeError`` naming the first bad field; return ``self``."""
        check_source(self, DATASETS)
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        check_ints(self, ("seed",), minimum=0)
        check_ints(self, ("memorisation_epochs",), optional=True)
        check_ints(self, ("num_seeds", "epochs", "batch_size", "eval_batch_size"))
        if not is_int(self.lr_warmup_epochs) or not 0 <= self.lr_warmup_epochs < self.epochs:
            raise ValueError(
                f"lr_warmup_epochs must be an int in [0, epochs={self.epochs}), got "
                f"{self.lr_warmup_epochs!r}"
            )
        check_ints(self, ("train_subset", "test_subset", "memorisation_subset"), optional=True)
        check_floats(
            self,
            (
                ("learning_rate", 0.0, math.inf),
                ("momentum", 0.0, 1.0),
                ("weight_decay", 0.0, math.inf),
            ),
        )
        check_widths(self)
        if (
            not isinstance(self.sparsities, tuple)
            or not self.sparsities
            or not all(is_real(s) and 0.0 < s < 1.0 for s in self.sparsities)
        ):
            raise ValueError(
                f"sparsities must be a non-empty tuple of floats in (0, 1), got {self.sparsities!r}"
            )
        if len({f"{s:g}" for s in self.sparsities}) != len(self.sparsities):
            raise ValueError(f"sparsities must be distinct, got {self.sparsities!r}")
        for name in ("memorisation", "memorisation_only"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.memorisation_only and not self.memorisation:
            raise ValueError("memorisation_only=True needs memorisation=True")
        if not isinstance(self.progress, bool):
            raise TypeError(f"progress must be a bool, got {self.progress!r}")
        if not is_real(self.memorisation_fraction) or not 0.0 < self.memorisation_fraction < 1.0:
            raise ValueError(
                f"memorisation_fraction must be a float in (0, 1), got "
                f"{self.memorisation_fraction!r}"
            )
        if not is_real(self.memorisation_sparsity) or not 0.0 < self.memorisation_sparsity < 1.0:
            raise ValueError(
                f"memorisation_sparsity must be a float in (0, 1), got "
                f"{self.memorisation_sparsity!r}"
            )
        for name in (
            "warmup_epochs",
            "compressed_epochs",
            "decompressed_epochs",
            "final_compressed_epochs",
        ):
            value = getattr(self, name)
            minimum = 0 if name == "warmup_epochs" else 1
            if value is not None and (not is_int(value) or value < minimum):
                raise ValueError(f"{name} must be None or an int >= {minimum}, got {value!r}")
        self._check_timeline("epochs")
        if self.memorisation and self.memorisation_epochs is not None:
            self.memorisation_config()._check_timeline("memorisation_epochs")
        return self

    def _check_timeline(self, name: str) -> None:
        w, c, d, final = self.phase_epochs()
        if w + c + d + final > self.epochs:
            raise ValueError(
                f"{name}: the AC/DC timeline needs warm-up + one compressed + one decompressed "
                f"phase + the final compressed phase = {w} + {c} + {d} + {final} = "
                f"{w + c + d + final} epochs, got {name}={self.epochs}"
            )
