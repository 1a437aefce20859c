"""Optax transformations that compress while they optimise.

Every factory returns an ``optax.GradientTransformation`` (or ``...ExtraArgs``) whose state
holds the masks, so ``optax.apply_updates`` alone yields compressed params, Orbax saves the
masks with the optimizer state, and shardings follow the params.
"""

from jaxcompress.optim._acdc import AcdcState, acdc, moment_leaves
from jaxcompress.optim._cram import CramState, cram
from jaxcompress.optim._gmp import GmpState, gmp, gmp_sparsity
from jaxcompress.optim._masked import (
    FixedMaskState,
    MaskedState,
    fixed_mask,
    masked,
    masked_params,
)
from jaxcompress.optim._schedule import AcdcSchedule, acdc_schedule, acdc_schedule_from_epochs

__all__ = [
    "AcdcSchedule",
    "AcdcState",
    "CramState",
    "FixedMaskState",
    "GmpState",
    "MaskedState",
    "acdc",
    "acdc_schedule",
    "acdc_schedule_from_epochs",
    "cram",
    "fixed_mask",
    "gmp",
    "gmp_sparsity",
    "masked",
    "masked_params",
    "moment_leaves",
]
