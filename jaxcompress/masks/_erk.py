"""Erdős-Rényi-Kernel (ERK) per-layer sparsities (Evci et al. 2020, "Rigging the Lottery").

Each selected leaf ``l`` with shape ``(d_1, ..., d_k)`` and ``N_l = prod(d)`` entries gets
density

    rho_l = eps * r_l,    r_l = (sum(d) / prod(d)) ** power_scale,

with one global ``eps`` chosen so the total kept count equals ``(1 - s) * N_total``:

    sum_{l dense} N_l + eps * sum_{l not dense} r_l N_l = (1 - s) * N_total.

Leaves whose density would exceed 1 are made dense (``rho_l = 1``) and ``eps`` is solved
again over the rest, until no density exceeds 1 (RigL's ``is_eps_valid`` loop). Small
layers thus stay denser than big ones. ``power_scale = 0`` gives uniform sparsity.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxcompress.masks._magnitude import check_sparsity
from jaxcompress.masks._selection import (
    Selector,
    check_selected_floating,
    check_selection,
    prunable,
)


def erk(
    params: Any,
    sparsity: float,
    *,
    where: Selector = prunable,
    power_scale: float = 1.0,
    strict: bool = False,
) -> Any:
    """Per-leaf ERK sparsity tree (floats for selected leaves, None elsewhere).

    The result can be passed as ``sparsity`` to ``magnitude(..., scope="layer")``. The
    real-valued kept counts ``sum_l (1 - s_l) N_l`` equal ``(1 - sparsity) * N_total``;
    after per-leaf ``ceil`` the integer total is within the number of leaves of it.

    Args:
      params: a pytree of arrays (shapes/dtypes only are read; ShapeDtypeStructs work).
      sparsity: overall target sparsity, a Python float in [0, 1).
      where: selector; default :func:`prunable`.
      power_scale: exponent on ``sum(d)/prod(d)`` (RigL's ``erk_power_scale``), >= 0.
      strict: raise a ``ValueError`` instead of an :class:`EmptySelectionWarning` when no
        leaf is selected (every entry of the result would be None).
    """
    if not isinstance(sparsity, int | float | np.floating) or isinstance(sparsity, bool):
        raise TypeError(
            f"sparsity: expected a Python float in [0, 1) (ERK is computed on the host), got "
            f"{type(sparsity).__name__} {sparsity!r}"
        )
    sparsity = check_sparsity(float(sparsity))
    if (
        isinstance(power_scale, bool)
        or not isinstance(power_scale, int | float)
        or not 0 <= power_scale < float("inf")
    ):
        raise ValueError(f"power_scale: expected a finite float >= 0, got {power_scale!r}")
    if not callable(where):
        raise TypeError(f"where: expected a selector (path, leaf) -> bool, got {where!r}")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    chosen = [i for i, (p, x) in enumerate(leaves) if where(p, x)]
    for i in chosen:
        check_selected_floating(*leaves[i])
    check_selection("erk", leaves, chosen, where, strict)

    sizes = np.array([np.prod(leaves[i][1].shape, dtype=np.float64) for i in chosen])
    raw = np.array(
        [
            (np.sum(leaves[i][1].shape, dtype=np.float64) / s) ** power_scale if s else 0.0
            for i, s in zip(chosen, sizes, strict=True)
        ]
    )
    target = (1.0 - sparsity) * sizes.sum()
    dense = sizes == 0
    while True:
        free = ~dense
        budget = target - sizes[dense].sum()
        divisor = (raw[free] * sizes[free]).sum()
        eps = budget / divisor if divisor > 0 else 0.0
        over = free & (eps * raw > 1.0)
        if not over.any():
            break
        dense |= over
    density = np.where(dense, 1.0, np.clip(eps * raw, 0.0, 1.0))
    out: list[Any] = [None] * len(leaves)
    for i, d in zip(chosen, density, strict=True):
        out[i] = float(min(max(1.0 - d, 0.0), np.nextafter(1.0, 0.0)))
    return jax.tree_util.tree_unflatten(treedef, out)
