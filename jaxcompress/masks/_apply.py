"""Applying mask trees to params, and checking that a mask tree fits a params tree.

A mask tree mirrors the params tree: a pruned leaf has a boolean array of the param's
shape (``True`` = kept), an unpruned leaf has ``None``. Trees are walked with the mask tree
first and ``is_leaf=lambda x: x is None``, so a ``None`` stands for a whole param leaf.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress._tree import is_none
from jaxcompress.masks._selection import path_str


def validate_masks(params: Any, masks: Any, argname: str = "masks") -> None:
    """Raise ValueError if ``masks`` is not a mask tree for ``params``.

    Checks, leaf by leaf and naming the leaf path: the two trees have the same structure and
    key paths; every non-None mask is a boolean array of the param's shape. Works on
    concrete arrays, tracers and :class:`jax.ShapeDtypeStruct` (only shapes/dtypes are read).
    """
    mask_leaves, mask_def = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_none)
    param_leaves, param_def = jax.tree_util.tree_flatten_with_path(params)
    mask_paths = [path_str(p) for p, _ in mask_leaves]
    param_paths = [path_str(p) for p, _ in param_leaves]
    if mask_paths != param_paths or len(mask_leaves) != len(param_leaves):
        missing = [p for p in param_paths if p not in set(mask_paths)]
        extra = [p for p in mask_paths if p not in set(param_paths)]
        raise ValueError(
            f"{argname}: tree does not mirror params (params has {len(param_paths)} leaves, "
            f"{argname} has {len(mask_paths)}); leaves missing from {argname}: {missing[:5]}, "
            f"unexpected leaves: {extra[:5]}. Use None for leaves that are not pruned."
        )
    for (path, mask), (_, param) in zip(mask_leaves, param_leaves, strict=True):
        if mask is None:
            continue
        dtype = getattr(mask, "dtype", None)
        if dtype is None or dtype != jnp.bool_:
            raise ValueError(
                f"{argname}: leaf {path_str(path)!r} has dtype {dtype or type(mask).__name__}; "
                "expected a boolean array (True = kept) or None"
            )
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(
                f"{argname}: leaf {path_str(path)!r} has shape {tuple(mask.shape)}; expected "
                f"the param's shape {tuple(param.shape)}"
            )
    if mask_def.num_leaves != param_def.num_leaves:  # pragma: no cover - guarded above
        raise ValueError(f"{argname}: tree structure differs from params")


def map_masked(fn: Callable[[Any, Any], Any], params: Any, masks: Any) -> Any:
    """``fn(param, mask)`` on every leaf whose mask is not None; other params unchanged.

    The result has the structure of ``params``. Used by the optax transforms to act only on
    pruned leaves. No validation is done here (it is on hot paths); call
    :func:`validate_masks` once up front.
    """
    return jax.tree.map(
        lambda mask, param: param if mask is None else fn(param, mask),
        masks,
        params,
        is_leaf=is_none,
    )


def apply(params: Any, masks: Any) -> Any:
    """Zero the pruned entries: ``w * m`` for masked leaves, dtype and sharding preserved.

    Implemented as ``where(m, w, 0)`` so pruned ``inf``/``nan`` entries become exactly 0.
    """
    validate_masks(params, masks)
    return map_masked(lambda w, m: jnp.where(m, w, jnp.zeros((), w.dtype)), params, masks)
