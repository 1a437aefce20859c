"""One-shot pruning and BatchNorm recalibration.

* :func:`oneshot`: magnitude (global or per-layer) or N:M pruning of a params tree in one shot.
* :func:`recalibrate_batchnorm`: re-estimate the BatchNorm running statistics of a pruned Flax
  NNX model with forward passes over calibration data ("BN tuning" in CrAM, Peste et al. 2023).
* :func:`calibration_batches`: random calibration batches drawn from a training set.
"""

from jaxcompress.prune._batchnorm import (
    batchnorm_modules,
    calibration_batches,
    recalibrate_batchnorm,
)
from jaxcompress.prune._oneshot import oneshot

__all__ = ["batchnorm_modules", "calibration_batches", "oneshot", "recalibrate_batchnorm"]
