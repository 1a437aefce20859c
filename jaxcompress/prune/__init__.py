"""One-shot pruning and BatchNorm recalibration.

* :func:`oneshot`: magnitude (global or per-layer) or N:M pruning of a params tree in one shot.
* :func:`sparsegpt`: one-shot pruning of a Flax NNX model with layer-wise OBS reconstruction
  (SparseGPT, Frantar & Alistarh 2023), calibrated sequentially on calibration data;
  :func:`sparsegpt_layer` is the solver for one kernel and its Hessian.
* :func:`wanda`: one-shot pruning by ``|W| * ||X||`` per output unit (Wanda, Sun et al. 2024);
  :func:`wanda_layer` for one kernel.
* :func:`hessians`: the dense model's layer Hessians ``2 X^T X / n`` (e.g. for
  :func:`jaxcompress.spdy.obs_database`).
* :func:`structured`: structured one-shot pruning of any NNX model: whole channels, neurons and
  heads of its dependency groups (:mod:`jaxcompress.structure`) ranked by group norms
  (:func:`unit_scores`; DepGraph, Fang et al. 2023; Li et al. 2017) and physically removed.
* :func:`recalibrate_batchnorm`: re-estimate the BatchNorm running statistics of a pruned Flax
  NNX model with forward passes over calibration data ("BN tuning" in CrAM, Peste et al. 2023).
* :func:`calibration_batches`: random calibration batches drawn from a training set.
"""

from jaxcompress.prune._batchnorm import (
    batchnorm_modules,
    calibration_batches,
    recalibrate_batchnorm,
)
from jaxcompress.prune._calibrate import hessians
from jaxcompress.prune._obs import sparsegpt, wanda, wanda_layer
from jaxcompress.prune._oneshot import oneshot
from jaxcompress.prune._structured import structured
from jaxcompress.spdy._groups import unit_scores
from jaxcompress.spdy._obs import sparsegpt_layer

__all__ = [
    "batchnorm_modules",
    "calibration_batches",
    "hessians",
    "oneshot",
    "recalibrate_batchnorm",
    "sparsegpt",
    "sparsegpt_layer",
    "structured",
    "unit_scores",
    "wanda",
    "wanda_layer",
]
