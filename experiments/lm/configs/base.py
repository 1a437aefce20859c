"""The configuration dataclass of the LM experiment."""

from __future__ import annotations

import dataclasses

from experiments._common import (
    ConfigBase,
    check_bools,
    check_choices,
    check_floats,
    check_ints,
    check_path,
    field,
    is_int,
    is_real,
)

__all__ = ["PRUNERS", "TRAINERS", "Config"]

#: How the models are trained: AdamW (dense), CrAM+ with inner AdamW, AC/DC with inner AdamW.
TRAINERS = ("adamw", "cram", "acdc")
#: One-shot pruners applied to every trained model.
PRUNERS = ("magnitude", "wanda", "sparsegpt")


@dataclasses.dataclass(frozen=True)
class Config(ConfigBase):
    """Every setting of one run; :meth:`validate` checks them all before any work.

    The defaults are nanoGPT's CPU setting for ``shakespeare_char`` (4 layers, 4 heads, width
    128, context 64, batch 12, 2,000 iterations, AdamW with learning rate 1e-3 decayed to 1e-4
    by a cosine after 100 warm-up steps, beta2 0.99, weight decay 0.1, gradient clipping 1.0,
    dropout 0).
    """

    data_dir: str | None = field(None, "data root (none: $JAXCOMPRESS_DATA_DIR)")
    seed: int = field(0, "model initialisation, training windows, calibration and sampling seed")
    iters: int = field(2000, "optimizer steps per trained model")
    batch_size: int = field(12, "training windows per step")
    context: int = field(64, "context length (block size)")
    num_layers: int = field(4, "GPT blocks")
    num_heads: int = field(4, "attention heads")
    d_model: int = field(128, "model width")
    learning_rate: float = field(1e-3, "peak AdamW learning rate")
    min_lr: float = field(1e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = field(100, "linear warm-up steps")
    weight_decay: float = field(0.1, "decoupled AdamW weight decay on matrices and embeddings")
    trainers: tuple[str, ...] = field(TRAINERS, "how the models are trained", choices=TRAINERS)
    cram_rho: float = field(0.05, "CrAM perturbation radius rho")
    cram_sparsities: tuple[float, ...] = field(
        (0.5, 0.7), "per-layer magnitude sparsities CrAM draws from at each step"
    )
    acdc_sparsity: float = field(0.5, "per-layer sparsity of AC/DC's compressed phases")
    sparsities: tuple[float, ...] = field((0.5, 0.7), "one-shot unstructured sparsities")
    nm_patterns: tuple[tuple[int, int], ...] = field(((2, 4), (4, 8)), "one-shot N:M patterns")
    pruners: tuple[str, ...] = field(PRUNERS, "one-shot pruners", choices=PRUNERS)
    spdy_speedups: tuple[float, ...] | None = field(
        (1.5, 2.0), "modelled speedups of the SPDY profiles of the AdamW model (none: skip)"
    )
    structured_keeps: tuple[float, ...] | None = field(
        (0.75, 0.5),
        "kept fractions of every block's attention heads and MLP units in structured one-shot "
        "pruning of the AdamW model, then fine-tuned for iters // 10 steps (none: skip)",
    )
    calib_windows: int = field(128, "calibration windows (context long) for Wanda and SparseGPT")
    eval_windows: int = field(1000, "validation windows the loss is averaged over")
    sample_chars: int = field(200, "characters sampled from every model (0: none)")
    checkpoint_every: int = field(500, "save the training state every this many steps")
    progress: bool = field(True, "progress bars")

    def validate(self) -> Config:
        """Raise ``ValueError``/``TypeError`` naming the first bad field; return ``self``."""
        check_path(self, "data_dir")
        check_ints(self, ("seed", "sample_chars"), minimum=0)
        check_ints(
            self,
            (
                "iters",
                "batch_size",
                "context",
                "num_layers",
                "num_heads",
                "d_model",
                "calib_windows",
                "eval_windows",
                "checkpoint_every",
            ),
        )
        check_ints(self, ("warmup_iters",), minimum=0)
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model must be divisible by num_heads, got d_model={self.d_model}, "
                f"num_heads={self.num_heads}"
            )
        if self.warmup_iters >= self.iters:
            raise ValueError(
                f"warmup_iters must be less than iters={self.iters}, got {self.warmup_iters}"
            )
        check_floats(
            self,
            (
                ("learning_rate", 0.0, float("inf")),
                ("min_lr", 0.0, float("inf")),
                ("weight_decay", 0.0, float("inf")),
                ("cram_rho", 0.0, float("inf")),
                ("acdc_sparsity", 0.0, 1.0),
            ),
        )
        if not self.learning_rate > 0.0 or self.min_lr > self.learning_rate:
            raise ValueError(
                f"learning_rate must be > 0 and >= min_lr, got learning_rate="
                f"{self.learning_rate!r}, min_lr={self.min_lr!r}"
            )
        check_choices(self, "trainers", TRAINERS)
        check_choices(self, "pruners", PRUNERS)
        for name in ("cram_sparsities", "sparsities"):
            value = getattr(self, name)
            if (
                not isinstance(value, tuple)
                or not value
                or not all(is_real(s) and 0.0 < s < 1.0 for s in value)
                or len(set(value)) != len(value)
            ):
                raise ValueError(
                    f"{name} must be a non-empty tuple of distinct floats in (0, 1), got {value!r}"
                )
        if not isinstance(self.nm_patterns, tuple) or not all(
            isinstance(p, tuple) and len(p) == 2 and all(is_int(v) for v in p) and 0 < p[0] < p[1]
            for p in self.nm_patterns
        ):
            raise ValueError(
                f"nm_patterns must be a tuple of (n, m) pairs with 0 < n < m, got "
                f"{self.nm_patterns!r}"
            )
        if len(set(self.nm_patterns)) != len(self.nm_patterns):
            raise ValueError(f"nm_patterns must be distinct, got {self.nm_patterns!r}")
        for n, m in self.nm_patterns:
            if self.d_model % m:
                raise ValueError(
                    f"nm_patterns: every block kernel's input size (d_model={self.d_model} and "
                    f"4 d_model) must be divisible by m, got pattern {n}:{m}"
                )
        if self.spdy_speedups is not None and (
            not isinstance(self.spdy_speedups, tuple)
            or not self.spdy_speedups
            or not all(is_real(v) and 1.0 < v < 100.0 for v in self.spdy_speedups)
            or len(set(self.spdy_speedups)) != len(self.spdy_speedups)
        ):
            raise ValueError(
                "spdy_speedups must be None or a non-empty tuple of distinct numbers in (1, 100), "
                f"got {self.spdy_speedups!r}"
            )
        if self.structured_keeps is not None and (
            not isinstance(self.structured_keeps, tuple)
            or not self.structured_keeps
            or not all(is_real(v) and 0.0 < v <= 1.0 for v in self.structured_keeps)
            or len(set(self.structured_keeps)) != len(self.structured_keeps)
        ):
            raise ValueError(
                "structured_keeps must be None or a non-empty tuple of distinct fractions in "
                f"(0, 1], got {self.structured_keeps!r}"
            )
        check_bools(self, ("progress",))
        return self
