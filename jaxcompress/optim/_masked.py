"""Fixed-support sparse training: an optax wrapper that keeps pruned weights at exactly zero."""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import optax

from jaxcompress._tree import is_none
from jaxcompress.masks import map_masked, path_str, validate_masks
from jaxcompress.optim._support import (
    cancel_pruned,
    check_inner,
    mask_leaf,
    masked_inner_update,
    place_masks,
)
from jaxcompress.optim._util import transform_needing_params

__all__ = ["FixedMaskState", "MaskedState", "fixed_mask", "masked", "masked_params"]


class FixedMaskState(NamedTuple):
    """State of :func:`fixed_mask`.

    Attributes:
      masks: the mask tree (mirrors the params; boolean arrays with ``True`` = kept, ``None``
        for leaves that are not pruned). It lives in the state so that checkpoints save it and
        so that its arrays carry the params' shardings.
      inner_state: the state of the wrapped optimizer.
    """

    masks: Any
    inner_state: optax.OptState


#: Deprecated alias of :class:`FixedMaskState` (kept for one release).
MaskedState = FixedMaskState


def fixed_mask(
    inner: optax.GradientTransformation, masks: Any
) -> optax.GradientTransformationExtraArgs:
    r"""Runs ``inner`` on a fixed sparse support, keeping pruned weights at exactly zero.

    With a boolean mask :math:`m` (``True`` = kept) per pruned leaf, gradients :math:`g_t`,
    params :math:`\theta_t` and inner update rule :math:`U` with state :math:`s_t`, one step is

    .. math::

        \tilde g_t &= m \odot g_t, \qquad \tilde\theta_t = m \odot \theta_t, \\
        (u_t, s_{t+1}) &= U(\tilde g_t, s_t, \tilde\theta_t), \\
        \Delta_t &= m \odot u_t + (1 - m) \odot (-\theta_t),

    so that ``optax.apply_updates(params, updates)`` gives :math:`m \odot (\theta_t + u_t)`:
    pruned entries become exactly ``0`` (in IEEE arithmetic :math:`x + (-x) = +0` for every
    finite :math:`x`), with no separate re-masking call, whatever ``inner`` is (momentum,
    decoupled weight decay, Lion, Adafactor, clipping, schedules, ``inject_hyperparams``).
    Because the inner optimizer only ever sees the masked gradients and masked params, its
    moments at pruned entries stay at zero and the kept entries evolve exactly as if ``inner``
    were run on the masked problem :math:`\theta \mapsto L(m \odot \theta)` restricted to the
    support (global statistics such as the gradient norm of ``clip_by_global_norm`` or
    Adafactor's factored moments are those of the masked gradients).

    This is the "fixed support" sparse fine-tuning used between mask updates by the reference
    code of CrAM (Peste et al., 2023, "CrAM: A Compression-Aware Minimizer", sparse
    fine-tuning after one-shot pruning) and in the compressed phases of AC/DC (Peste et al.,
    2021, "AC/DC: Alternating Compressed/DeCompressed Training of Deep Neural Networks"),
    where gradients are masked and the weights are re-masked after every optimizer step.

    Not to be confused with ``optax.masked``, which applies a transformation to a subset of
    the leaves: here every leaf goes through ``inner`` and the mask fixes which *entries* may
    be non-zero.

    The masks are stored in :class:`FixedMaskState`, so Orbax checkpoints include them; they
    are placed on the params' shardings when ``init`` is called on concrete (sharded) params.

    Args:
      inner: the optimizer to run on the support. Extra arguments given to ``update`` are
        forwarded to it when it accepts them (``optax.with_extra_args_support``).
      masks: a mask tree mirroring the params: boolean arrays of the param's shape (``True`` =
        kept) for pruned leaves, ``None`` for leaves that are not pruned. Validated against the
        params in ``init``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires ``params``.

    Raises:
      TypeError: ``inner`` is not an optax transformation.
      ValueError: in ``init``, ``masks`` does not mirror the params; in ``update``, the
        updates or params do not have the structure and shapes of the masks (the message
        names the first differing leaf path), or ``params`` is missing.
    """
    inner = check_inner(inner, "fixed_mask")

    def init_fn(params: optax.Params) -> FixedMaskState:
        validate_masks(params, masks, "masks")
        state_masks = place_masks(masks, params)
        inner_params = map_masked(mask_leaf, params, state_masks)
        return FixedMaskState(masks=state_masks, inner_state=inner.init(inner_params))

    def update_fn(
        updates: optax.Updates, state: FixedMaskState, params: optax.Params, extra_args: dict
    ) -> tuple[optax.Updates, FixedMaskState]:
        # Static checks (run once per trace under jit): a mismatch would otherwise fail deep
        # inside jax.tree.map with a message that names no leaf.
        _check_like_masks(updates, state.masks, "updates")
        _check_like_masks(params, state.masks, "params")
        inner_updates, inner_state = masked_inner_update(
            inner, updates, state.inner_state, params, state.masks, extra_args
        )
        new_updates = cancel_pruned(state.masks, inner_updates, params)
        return new_updates, FixedMaskState(masks=state.masks, inner_state=inner_state)

    return transform_needing_params(
        init_fn, "fixed_mask()", FixedMaskState, "to keep pruned weights at zero", update_fn
    )


def masked(
    inner: optax.GradientTransformation, masks: Any
) -> optax.GradientTransformationExtraArgs:
    """Deprecated alias of :func:`fixed_mask` (renamed so that it is not confused with
    ``optax.masked``); it will be removed in the next release."""
    warnings.warn(
        "jaxcompress.optim.masked is deprecated and will be removed in the next release; use "
        "jaxcompress.optim.fixed_mask (same arguments; its state is FixedMaskState)",
        DeprecationWarning,
        stacklevel=2,
    )
    return fixed_mask(inner, masks)


def _check_like_masks(tree: Any, masks: Any, argname: str) -> None:
    """Raise ``ValueError`` unless ``tree`` has the leaf paths of ``masks`` and, where a mask
    is set, its shape; the message names the first differing path."""
    mask_leaves = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_none)[0]
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for i, ((mpath, mask), (path, leaf)) in enumerate(zip(mask_leaves, leaves, strict=False)):
        if path_str(mpath) != path_str(path):
            raise ValueError(
                f"{argname}: tree does not match the masks in the state: leaf {i} is "
                f"{path_str(path)!r} where the masks have {path_str(mpath)!r} (the first "
                f"differing path; {argname} has {len(leaves)} leaves, the masks "
                f"{len(mask_leaves)})"
            )
        shape = getattr(leaf, "shape", None)
        if mask is not None and (shape is None or tuple(shape) != tuple(mask.shape)):
            raise ValueError(
                f"{argname}: leaf {path_str(path)!r} has shape "
                f"{None if shape is None else tuple(shape)}; the mask in the state has shape "
                f"{tuple(mask.shape)}"
            )
    if len(leaves) != len(mask_leaves):
        longer, name = (
            (leaves, argname)
            if len(leaves) > len(mask_leaves)
            else (
                mask_leaves,
                "the masks",
            )
        )
        extra = path_str(longer[min(len(leaves), len(mask_leaves))][0])
        raise ValueError(
            f"{argname}: tree does not match the masks in the state: {argname} has "
            f"{len(leaves)} leaves, the masks {len(mask_leaves)}; the first differing path is "
            f"{extra!r}, present only in {name}"
        )


def masked_params(params: optax.Params, state: Any) -> optax.Params:
    """Returns ``params`` with the entries pruned by the masks of ``state`` set to zero.

    Useful once, before training starts, when the params are not yet sparse: ``fixed_mask`` makes
    every pruned entry exactly zero after the first update anyway, but a forward pass taken
    before that update should already see the sparse model.

    Args:
      params: the params tree.
      state: a :class:`FixedMaskState`, or an optimizer state that contains exactly one (for
        example the state of ``optax.chain(..., fixed_mask(...))``).

    Returns:
      :math:`m \\odot \\theta` with the same structure, dtypes and shardings as ``params``.
    """
    found = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, FixedMaskState))
        if isinstance(s, FixedMaskState)
    ]
    if len(found) != 1:
        raise ValueError(
            "masked_params(): argument 'state' must contain exactly one FixedMaskState, found "
            f"{len(found)} in a {type(state).__name__}."
        )
    masks = found[0].masks
    validate_masks(params, masks, "state.masks")
    return map_masked(mask_leaf, params, masks)
