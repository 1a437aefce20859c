"""The configuration dataclass of the CrAM experiment."""

from __future__ import annotations

import dataclasses
import math

from experiments._common import (
    MODELS,
    RecalibrationConfig,
    check_choices,
    check_floats,
    check_fractions,
    check_ints,
    field,
    is_int,
)

METHODS = ("sgd", "cram", "cram_nm")


@dataclasses.dataclass(frozen=True)
class Config(RecalibrationConfig):
    """Every setting of one run: :class:`experiments._common.RecalibrationConfig` and the
    fields below; :meth:`validate` checks them all before any work.

    Training is the same for every method; only the optimizer differs. CrAM+ keeps the
    reference's defaults (``plus=True``, ``sparse_grad=True``, no gradient normalisation).
    The one-shot evaluation prunes every trained model (global magnitude at ``sparsities``,
    N:M at ``nm_patterns``) and recalibrates BatchNorm as the reference's BNT. Kernels whose
    contracting dimension is not divisible by every ``m`` of ``nm_patterns`` (e.g. a first
    conv with one input channel) stay dense in CrAM+N:M training and N:M pruning.
    """

    num_seeds: int = field(
        1,
        "repetitions with seeds seed, seed+1, ...: mean (and std) over seeds",
        aliases=("--seeds",),
    )
    learning_rate: float = field(0.05, "peak SGD learning rate (cosine decay to 0)")
    model: str = field("small_cnn", "BatchNorm CNN to train", choices=MODELS)
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

    def validate(self) -> Config:
        """Raise ``ValueError``/``TypeError`` naming the first bad field; return ``self``."""
        self.check_recalibration()
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        check_ints(self, ("num_seeds",))
        check_floats(self, (("rho", 0.0, math.inf),))
        check_choices(self, "methods", METHODS)
        check_fractions(self, "sparsities")
        check_fractions(self, "cram_sparsities")
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
