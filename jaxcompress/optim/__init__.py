"""Optax transformations that compress while they optimise.

Every factory returns an ``optax.GradientTransformation`` (or ``...ExtraArgs``) whose state
holds the masks, so ``optax.apply_updates`` alone yields compressed params, Orbax saves the
masks with the optimizer state, and shardings follow the params.
"""

from jaxcompress.optim._cram import CramState, cram
from jaxcompress.optim._masked import MaskedState, masked, masked_params

__all__ = ["CramState", "MaskedState", "cram", "masked", "masked_params"]
