"""The configuration dataclass of the AC/DC experiment."""

from __future__ import annotations

import dataclasses

from experiments._common import (
    MODELS,
    SGDConfig,
    check_fractions,
    check_ints,
    field,
    is_int,
    is_real,
)

MEMORISATION = ("yes", "no", "only")


@dataclasses.dataclass(frozen=True)
class Config(SGDConfig):
    """Every setting of one run: :class:`experiments._common.SGDConfig` and the fields below;
    :meth:`validate` checks them all before any work.

    Training is the same for every method (only the optimizer wrapper differs); the AC/DC
    timeline is :meth:`phase_epochs` (``phases``, or the paper's proportions of ``epochs``).

    Memorisation trains dense and AC/DC on a training set with ``memorisation_fraction`` random
    labels. Fewer examples are memorised in fewer epochs: with 2,000 Fashion-MNIST examples
    (200 random labels) a dense SmallCNN fits most random labels within 30 epochs, with 10,000
    it fits almost none within 20. The reference trains 200 epochs with 20-epoch phases; random
    labels are fitted late, so a longer run on the small subset shows several cycles after
    memorisation has started, at a small cost (2,000 examples are 16 steps per epoch). At 90%
    sparsity the sparse model still re-fits all 200 random labels within a compressed phase, at
    95% it cannot, hence ``memorisation_sparsity=0.95`` (``experiments/acdc/RESULTS.md``).
    """

    num_seeds: int = field(
        1,
        "repetitions with seeds seed, seed+1, ...: mean (and std) over seeds",
        aliases=("--seeds",),
    )
    epochs: int = field(30, "epoch budget E of every method; the AC/DC phases scale with it")
    learning_rate: float = field(0.1, "peak SGD learning rate of the reference CosineLR")
    lr_warmup_epochs: int = field(1, "linear learning-rate warm-up epochs of CosineLR")
    model: str = field("small_cnn", "BatchNorm CNN to train", choices=MODELS)
    sparsities: tuple[float, ...] = field(
        (0.9, 0.95), "target sparsities (global magnitude) of AC/DC, GMP and one-shot + FT"
    )
    phases: tuple[int, int, int, int] | None = field(
        None,
        "AC/DC timeline W:C:D:L in epochs: dense warm-up, compressed, decompressed, final "
        "compressed phase (none: round(E/10) each, at least 1, and L = round(E/5)); GMP ramps "
        "from W to E-L, one-shot + FT prunes at E-L",
    )
    memorisation: str = field(
        "yes", "random-label memorisation runs: yes, no, or only them", choices=MEMORISATION
    )
    memorisation_fraction: float = field(0.1, "fraction of training labels randomised")
    memorisation_sparsity: float = field(0.95, "AC/DC sparsity of the memorisation run")
    memorisation_subset: int | None = field(
        2_000, "train the memorisation runs on a random subset of this size (none: all)"
    )
    memorisation_epochs: int | None = field(
        60, "epoch budget of the memorisation runs, AC/DC phases scaled to it (none: epochs)"
    )

    def memorisation_config(self) -> Config:
        """The configuration of the memorisation runs: ``epochs = memorisation_epochs``."""
        if self.memorisation_epochs is None:
            return self
        return self.replace(epochs=self.memorisation_epochs)

    def phase_epochs(self) -> tuple[int, int, int, int]:
        """``(W, C, D, L)``: warm-up, compressed, decompressed and final compressed epochs.

        ``phases`` when set; else the paper's proportions (10 dense warm-up epochs, 5-epoch phases
        and a 15-epoch final phase out of 100 on ImageNet), scaled to ``epochs``:
        :math:`W = C = D = \\max(1, \\mathrm{round}(E/10))`, :math:`L = \\max(1,
        \\mathrm{round}(E/5))`. The last decompressed phase absorbs
        :math:`(E - L - W) \\bmod (C + D)` extra epochs (:class:`jaxcompress.optim.AcdcSchedule`).
        """
        if self.phases is not None:
            return tuple(self.phases)  # type: ignore[return-value]
        tenth = max(1, round(self.epochs / 10))
        w, c, d, final = tenth, tenth, tenth, max(1, round(self.epochs / 5))
        return w, c, d, final

    def validate(self) -> Config:
        """Raise ``ValueError``/``TypeError`` naming the first bad field; return ``self``."""
        self.check_sgd()
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        check_ints(self, ("num_seeds",))
        check_ints(self, ("memorisation_epochs", "memorisation_subset"), optional=True)
        if not is_int(self.lr_warmup_epochs) or not 0 <= self.lr_warmup_epochs < self.epochs:
            raise ValueError(
                f"lr_warmup_epochs must be an int in [0, epochs={self.epochs}), got "
                f"{self.lr_warmup_epochs!r}"
            )
        check_fractions(self, "sparsities", zero=False)
        if self.memorisation not in MEMORISATION:
            raise ValueError(
                f"memorisation must be one of {MEMORISATION}, got {self.memorisation!r}"
            )
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
        if self.phases is not None and (
            not isinstance(self.phases, tuple)
            or len(self.phases) != 4
            or not all(is_int(v) for v in self.phases)
            or self.phases[0] < 0
            or min(self.phases[1:]) < 1
        ):
            raise ValueError(
                "phases must be None or (W, C, D, L) ints with W >= 0 and C, D, L >= 1, "
                f"got {self.phases!r}"
            )
        self._check_timeline("epochs")
        if self.memorisation != "no" and self.memorisation_epochs is not None:
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
