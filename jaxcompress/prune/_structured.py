"""Structured one-shot pruning of any Flax NNX model by group norms."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flax import nnx

from jaxcompress import structure
from jaxcompress._checks import check_fraction
from jaxcompress.prune._batchnorm import batchnorm_modules, recalibrate_batchnorm
from jaxcompress.spdy._groups import (
    check_score,
    check_scores,
    kept_count,
    top_units,
    unit_scores,
)

__all__ = ["structured"]


def _check_counts(keep: Mapping[str, Any]) -> dict[str, int | float]:
    out: dict[str, int | float] = {}
    for name, v in keep.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(
                f"keep[{name!r}] must be a kept unit count (int) or fraction in (0, 1], got {v!r}"
            )
        if isinstance(v, (int, np.integer)):
            if v < 1:
                raise ValueError(f"keep[{name!r}] must keep at least one unit, got {v!r}")
            out[name] = int(v)
        else:
            out[name] = check_fraction(f"keep[{name!r}]", v, what="a kept fraction")
    return out


def structured(
    model: nnx.Module,
    keep: float | Mapping[str, int | float],
    *inputs,
    score: str | Mapping[str, Any] = "l2",
    calibration: Iterable[Any] | None = None,
) -> tuple[nnx.Module, dict[str, np.ndarray]]:
    """Prune whole units (channels, neurons, heads) of any NNX model in one shot.

    The units of every dependency group (:func:`jaxcompress.structure.groups`) are scored by
    the norm of all the parameter slices they index, across the group: the output slices of
    the kernels that write the unit, biases and norm parameters on it, and the input rows of
    every kernel that reads it (``score="l2"``: the group L2 norm of DepGraph, Fang et al.,
    CVPR 2023; ``"l1"``: the group L1 norm, which for a conv-conv pair is the filter L1 norm of
    Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017, plus the next layer's input
    rows; see :func:`unit_scores`). Each group keeps its highest-scoring units
    (ties to the lower index) and :func:`jaxcompress.structure.prune` removes the others
    physically, across residual adds, concatenations, depthwise convs and attention heads.

    Args:
      model: any ``flax.nnx.Module`` (not modified).
      keep: a kept fraction ``f`` in ``(0, 1]`` for every prunable group (each keeps
        ``ceil(f * size)`` units, at least 1), or ``{group name: kept count (int) or kept
        fraction (float)}``; groups not named stay whole.
      *inputs: example inputs of ``model(*inputs)``.
      score: ``"l2"``, ``"l1"`` or ``{group name: float[size]}`` unit scores of your own (e.g.
        Taylor or activation statistics).
      calibration: optional calibration batches: the pruned model's BatchNorm statistics are
        then re-estimated (:func:`jaxcompress.prune.recalibrate_batchnorm`, its defaults).

    Returns:
      ``(pruned_model, keep_masks)``: the smaller model, in eval mode, and ``{group name:
      bool[size]}`` for every group pruned (True kept), as ``structure.prune`` takes them.

    Raises:
      TypeError, ValueError: a fraction outside ``(0, 1]``, a count below 1 or above the
        group's size, an unknown group, a group that is not prunable (with its reasons), bad
        scores or ``calibration`` on a model without BatchNorm, all before pruning.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    if isinstance(keep, Mapping):
        wanted: dict[str, int | float] | float = _check_counts(keep)
    else:
        wanted = check_fraction("keep", keep, what="a kept fraction")
    check_score(score)
    if calibration is not None and not batchnorm_modules(model):
        raise ValueError(
            f"calibration re-estimates BatchNorm statistics, but {type(model).__name__} has "
            "no nnx.BatchNorm"
        )
    groups = structure.groups(model, *inputs)
    if isinstance(wanted, float):
        counts = {n: kept_count(wanted, g.size) for n, g in groups.items() if g.prunable}
    else:
        counts = {}
        for name, v in wanted.items():
            if name not in groups:
                raise ValueError(
                    f"keep names an unknown group {name!r}; the model's groups are {list(groups)}"
                )
            g = groups[name]
            k = kept_count(v, g.size) if isinstance(v, float) else v
            if k > g.size:
                raise ValueError(f"keep[{name!r}] = {k} exceeds the group's {g.size} units")
            if k < g.size and not g.prunable:
                raise ValueError(f"group {name!r} is not prunable ({'; '.join(g.reasons)})")
            counts[name] = k
    scores = check_scores(score, groups, list(counts))
    if scores is None:
        scores = unit_scores(model, {n: groups[n] for n in counts}, str(score))
    masks = {n: top_units(scores[n], k) for n, k in counts.items()}
    pruned = structure.prune(model, masks, *inputs)
    if calibration is not None:
        recalibrate_batchnorm(pruned, calibration)
    pruned.eval()
    return pruned, masks
