r"""BatchNorm recalibration ("BN tuning") after pruning, for Flax NNX models.

Pruning changes the distribution of every pre-BatchNorm activation, so the running statistics a
dense model learned no longer match. Re-estimating them on a few training batches, with no
gradient step, recovers much of the accuracy lost to one-shot pruning (Peste et al., "CrAM: A
Compression-Aware Minimizer", ICLR 2023, Sec. 4 and ``fix_bn_stats`` in the reference code;
Hubara et al., "Accelerated Sparse Neural Training", 2021).

Procedure (:func:`recalibrate_batchnorm`):

1. reset every ``nnx.BatchNorm``: running mean :math:`\hat\mu = 0`, running variance
   :math:`\hat\sigma^2 = 1`;
2. for :math:`t = 1..T` (``num_batches``, cycling the calibration data if it is shorter), run the
   model forward in train mode (normalising with batch statistics, no gradients) on batch
   :math:`x_t`, giving per-layer batch statistics :math:`(\mu_t, \sigma^2_t)`, and update

   .. math:: \hat\mu \leftarrow \hat\mu + w_t(\mu_t - \hat\mu), \qquad
             \hat\sigma^2 \leftarrow \hat\sigma^2 + w_t(\sigma^2_t - \hat\sigma^2),

   with :math:`w_t = \alpha` (``mode="ema"``, ``momentum=α``; PyTorch's convention, the weight
   of the *new* batch; Flax's ``BatchNorm.momentum`` is :math:`1-\alpha`) or :math:`w_t = 1/t`
   (``mode="cumulative"``: the exact mean of the per-batch statistics, PyTorch's
   ``momentum=None``);
3. leave the model in eval mode with every BatchNorm's own ``momentum`` unchanged.

With ``mode="ema"`` the reset values keep a weight :math:`(1-\alpha)^T` in the result
(0.07 for 25 batches at :math:`\alpha=0.1`, which visibly biases small variances); a warning is
issued when it exceeds 1%. The CrAM reference uses ``mode="ema"``, :math:`\alpha = 0.1`, 100
batches of 128 random training images, which are the defaults. Differences from PyTorch: Flax
stores the biased batch variance (PyTorch the unbiased one, a factor :math:`n/(n-1)`, under 0.1%
for 128 x spatial positions), and Dropout stays off during calibration (the reference's
``model.train()`` turns it on) so the statistics describe the eval-time network.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import numbers
import warnings
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["batchnorm_modules", "calibration_batches", "recalibrate_batchnorm"]

_MODES = ("ema", "cumulative")


def batchnorm_modules(model: nnx.Module) -> list[tuple[tuple, nnx.BatchNorm]]:
    """Every ``nnx.BatchNorm`` in ``model`` with its graph path."""
    return [
        (tuple(path), module)
        for path, module in nnx.iter_graph(model)
        if isinstance(module, nnx.BatchNorm)
    ]


def _batch_input(batch: Any) -> Any:
    """The model input of a calibration batch: an array, ``(x, y)``, or ``{"x"|"image": ...}``."""
    if isinstance(batch, tuple | list):
        if not batch:
            raise ValueError("recalibrate_batchnorm: got an empty batch tuple")
        return batch[0]
    if isinstance(batch, dict):
        for key in ("x", "image"):
            if key in batch:
                return batch[key]
        raise ValueError(
            f"recalibrate_batchnorm: a dict batch needs an 'x' or 'image' key, got {list(batch)}"
        )
    if hasattr(batch, "x") and hasattr(batch, "y"):
        return batch.x
    return batch


@dataclasses.dataclass(frozen=True)
class _BatchNormStats:
    """NNX filter for the ``BatchStat`` variables of the BatchNorm modules at ``paths``.

    Frozen and hashable by value, so the jitted pass below is cached across calls.
    """

    paths: frozenset

    def __call__(self, path: tuple, value: Any) -> bool:
        return isinstance(value, nnx.BatchStat) and tuple(path[:-1]) in self.paths


@functools.partial(jax.jit, static_argnums=(0, 1))
def _calibration_update(graphdef, stat_filter, params, running, rest, x, weight):
    """One forward pass in train mode; blend its batch statistics into ``running``."""
    model = nnx.merge(graphdef, params, running, rest, copy=True)
    model(x)
    # Every recalibrated BatchNorm runs with Flax momentum 0, so its statistics now hold this
    # batch's mean and variance alone.
    _, _, batch_stats, _ = nnx.split(model, nnx.Param, stat_filter, ...)
    return jax.tree.map(lambda r, b: r + weight * (b - r), running, batch_stats)


def recalibrate_batchnorm(
    model: nnx.Module,
    batches: Iterable[Any],
    *,
    num_batches: int = 100,
    momentum: float = 0.1,
    mode: str = "ema",
) -> nnx.Module:
    """Re-estimate every BatchNorm's running statistics of ``model`` in place.

    See the module docstring for the maths. Gradients are never computed and no ``nnx.Param``
    changes; only the ``mean``/``var`` of ``nnx.BatchNorm`` modules are written.

    Args:
      model: a Flax NNX model with at least one ``nnx.BatchNorm``.
      batches: an iterable of calibration batches: arrays, ``(x, y)`` pairs, or dicts with an
        ``"x"`` or ``"image"`` key. Cycled if it yields fewer than ``num_batches``. Equal batch
        shapes reuse one compiled pass (see :func:`calibration_batches`).
      num_batches: forward passes :math:`T` (positive).
      momentum: EMA weight :math:`\\alpha` of the new batch, in ``(0, 1]``, PyTorch's convention
        (0.1 in the CrAM reference). Ignored by ``mode="cumulative"``.
      mode: ``"ema"`` (default, as the reference) or ``"cumulative"`` (exact mean over batches).

    Returns:
      ``model``, in eval mode.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    if isinstance(num_batches, bool) or not isinstance(num_batches, numbers.Integral):
        raise TypeError(f"num_batches must be a positive int, got {num_batches!r}")
    if num_batches <= 0:
        raise ValueError(f"num_batches must be a positive int, got {num_batches!r}")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a float in (0, 1], got {momentum!r}")
    if not 0.0 < float(momentum) <= 1.0:
        raise ValueError(
            f"momentum must be in (0, 1] (weight of the new batch, PyTorch convention), "
            f"got {momentum!r}"
        )
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if isinstance(batches, str | bytes) or not isinstance(batches, Iterable):
        raise TypeError(f"batches must be an iterable of batches, got {type(batches).__name__}")
    residual = (1.0 - float(momentum)) ** num_batches
    if mode == "ema" and residual > 0.01:
        warnings.warn(
            f"recalibrate_batchnorm: with mode='ema', momentum={momentum} and "
            f"num_batches={num_batches}, the reset statistics (mean 0, var 1) keep a weight of "
            f"(1 - momentum)**num_batches = {residual:.3g} in the result; use more batches, a "
            "larger momentum, or mode='cumulative'",
            stacklevel=2,
        )
    bns = batchnorm_modules(model)
    if not bns:
        raise ValueError("recalibrate_batchnorm: model has no flax.nnx.BatchNorm module")

    stat_filter = _BatchNormStats(frozenset(path for path, _ in bns))

    # Build the calibration graph with every BatchNorm at Flax momentum 0 (running stats := batch
    # stats), then put the model's own momentum back straight away.
    saved = [bn.momentum for _, bn in bns]
    try:
        for _, bn in bns:
            bn.momentum = 0.0
        view = nnx.view(
            model, use_running_average=False, deterministic=True, raise_if_not_found=False
        )
        graphdef, params, stats, rest = nnx.split(view, nnx.Param, stat_filter, ...)
    finally:
        for (_, bn), value in zip(bns, saved, strict=True):
            bn.momentum = value

    running = _reset_stats(stats)
    source = itertools.cycle(batches)
    for t in range(1, num_batches + 1):
        try:
            batch = next(source)
        except StopIteration:
            raise ValueError("recalibrate_batchnorm: batches is empty") from None
        x = jnp.asarray(_batch_input(batch))
        weight = jnp.asarray(1.0 / t if mode == "cumulative" else float(momentum), jnp.float32)
        running = _calibration_update(graphdef, stat_filter, params, running, rest, x, weight)
    nnx.update(model, running)
    model.eval()
    return model


def _reset_stats(stats: nnx.State) -> nnx.State:
    """Running mean 0, running variance 1 (``reset_running_stats``)."""
    flat = []
    for path, value in jax.tree_util.tree_flatten_with_path(stats)[0]:
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        is_var = "var" in names
        flat.append(jnp.ones_like(value) if is_var else jnp.zeros_like(value))
    treedef = jax.tree_util.tree_structure(stats)
    return jax.tree_util.tree_unflatten(treedef, flat)


def calibration_batches(
    ds: Any,
    *,
    num_batches: int = 100,
    batch_size: int = 128,
    subset_size: int | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """``num_batches`` input batches of ``batch_size`` drawn from a random training subset.

    A random subset of ``subset_size`` examples (default ``num_batches * batch_size``, capped at
    the dataset size) is drawn without replacement; batches then walk through freshly shuffled
    passes over that subset, as a shuffling data loader cycled by the reference would (the CrAM
    reference draws 1000 random ImageNet training images). Only inputs are returned.

    Args:
      ds: ``jaxcompress.data.ArrayDataset`` (``.x``), an ``(x, y)`` pair, or an input array.
      num_batches: number of batches (positive).
      batch_size: examples per batch (positive, at most the subset size).
      subset_size: size of the random calibration subset.
      seed: seed of the subset draw and the shuffles.

    Returns:
      A list of ``num_batches`` arrays of shape ``(batch_size, ...)``.
    """
    if hasattr(ds, "x"):
        x = np.asarray(ds.x)
    elif isinstance(ds, tuple | list) and len(ds) == 2:
        x = np.asarray(ds[0])
    else:
        x = np.asarray(ds)
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"ds must hold at least one example, got inputs of shape {x.shape}")
    for name, value in (("num_batches", num_batches), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if subset_size is None:
        subset_size = min(num_batches * batch_size, x.shape[0])
    elif (
        isinstance(subset_size, bool)
        or not isinstance(subset_size, numbers.Integral)
        or not 0 < subset_size <= x.shape[0]
    ):
        raise ValueError(
            f"subset_size must be an int in [1, {x.shape[0]}] (the dataset size), "
            f"got {subset_size!r}"
        )
    if batch_size > subset_size:
        raise ValueError(
            f"batch_size={batch_size} is larger than the calibration subset ({subset_size})"
        )
    rng = np.random.default_rng(seed)
    subset = rng.choice(x.shape[0], size=subset_size, replace=False)
    out: list[np.ndarray] = []
    order = np.empty((0,), np.int64)
    while len(out) < num_batches:
        if order.size < batch_size:
            order = np.concatenate([order, rng.permutation(subset)])
        out.append(x[order[:batch_size]])
        order = order[batch_size:]
    return out
