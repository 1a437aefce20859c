"""The configuration dataclass of the one-shot pruning experiment."""

from __future__ import annotations

import dataclasses

from experiments._common import (
    RecalibrationConfig,
    check_fractions,
    check_ints,
    check_widths,
    field,
    is_int,
    is_real,
)

# ``check_ints``, ``check_widths`` and ``is_real`` are imported from here by
# ``experiments.surrogate`` (rebuilt later); new code imports them from ``experiments._common``.
__all__ = ["Config", "check_ints", "check_widths", "is_real"]


@dataclasses.dataclass(frozen=True)
class Config(RecalibrationConfig):
    """Every setting of one run: :class:`experiments._common.RecalibrationConfig` and the
    one-shot pruning; :meth:`validate` checks them all before any work."""

    epochs: int = field(6, "training epochs")
    sparsities: tuple[float, ...] = field(
        (0.5, 0.7, 0.8, 0.9, 0.95), "global magnitude sparsities to prune at"
    )
    nm: tuple[int, int] | None = field((2, 4), "N:M pattern of the N:M pruning (none: skip it)")

    def validate(self) -> Config:
        """Raise ``ValueError``/``TypeError`` naming the first bad field; return ``self``."""
        self.check_recalibration()
        check_fractions(self, "sparsities")
        if self.nm is not None and (
            not isinstance(self.nm, tuple)
            or len(self.nm) != 2
            or not all(is_int(v) for v in self.nm)
            or not 0 < self.nm[0] < self.nm[1]
        ):
            raise ValueError(f"nm must be None or a pair (n, m) with 0 < n < m, got {self.nm!r}")
        return self
