r"""Gradual magnitude pruning (GMP) with the cubic sparsity schedule, as an optax wrapper.

Zhu and Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model
compression", ICLR 2018 workshop, arXiv:1710.01878. From step :math:`t_0` (``begin_step``) the
sparsity rises from :math:`s_i` (``initial_sparsity``) to :math:`s_f` (``sparsity``) over
:math:`n` pruning steps spaced :math:`\Delta t` (``every``) apart,

.. math::

    s_t = s_f + (s_i - s_f) \Big(1 - \frac{t - t_0}{n \Delta t}\Big)^3,
    \qquad t \in \{t_0,\ t_0 + \Delta t,\ \dots,\ t_0 + n \Delta t\},

with :math:`t_0 + n \Delta t` = ``end_step``. At each of these steps the mask is recomputed by
magnitude on the weights that are still kept, so a pruned weight stays pruned (the masks are
monotone) and the sparsity is exactly the scheduled one; between pruning steps, and after
``end_step``, the support is fixed and pruned weights stay exactly 0 (same mechanism as
:func:`jaxcompress.optim._masked.masked`). The cubic prunes fast early, when many weights are
redundant, and slowly near the target.

Like :func:`jaxcompress.optim._acdc.acdc`, the mask of a pruning step :math:`t` is computed at
the end of update :math:`t - 1` from the weights step :math:`t` will see, so the forward pass of
step :math:`t` already runs on the pruned model; ``state.masks`` is the mask in force at step
``state.count``. The mask update runs under ``lax.cond``: one compiled ``update`` for the whole
schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxcompress import masks as jc_masks
from jaxcompress._checks import check_int
from jaxcompress.masks._magnitude import check_sparsity
from jaxcompress.optim import _support
from jaxcompress.optim._placement import replicate_on_params_mesh
from jaxcompress.optim._util import next_count, transform_needing_params

__all__ = ["GmpState", "gmp", "gmp_sparsity"]

_SCOPES = ("global", "layer")


class GmpState(NamedTuple):
    """State of :func:`gmp`.

    Attributes:
      count: int32 number of updates applied so far (the step of the next update).
      masks: mask tree in force at step ``count`` (bool arrays, ``True`` = kept, ``None`` for
        unpruned leaves; all ``True`` before ``begin_step``).
      inner_state: state of the wrapped optimizer.
    """

    count: jax.Array
    masks: Any
    inner_state: optax.OptState


def _check_ramp(
    sparsity: Any, begin_step: Any, end_step: Any, every: Any, initial_sparsity: Any
) -> tuple[float, int, int, int, float]:
    final = check_sparsity(sparsity, "sparsity")
    initial = check_sparsity(initial_sparsity, "initial_sparsity")
    if not isinstance(final, float) or not isinstance(initial, float):
        raise TypeError(
            f"sparsity/initial_sparsity: expected Python floats, got {sparsity!r} and "
            f"{initial_sparsity!r}"
        )
    if initial > final:
        raise ValueError(
            f"initial_sparsity: expected a value <= sparsity={final} (the ramp only prunes), "
            f"got {initial}"
        )
    begin = check_int("begin_step", begin_step, minimum=0)
    end = check_int("end_step", end_step, minimum=0)
    step = check_int("every", every, minimum=1)
    if end <= begin:
        raise ValueError(f"end_step: expected an int > begin_step={begin}, got {end}")
    if (end - begin) % step:
        raise ValueError(
            f"every: end_step - begin_step = {end - begin} must be a multiple of every "
            f"(end_step = begin_step + n * every, so the last pruning step reaches the target), "
            f"got every={step}"
        )
    if end >= 2**31 - 1:
        raise ValueError(f"end_step: expected < 2^31 - 1 (int32 step counter), got {end}")
    return final, begin, end, step, initial


def _sparsity_at(step: Any, final: float, begin: int, end: int, every: int, initial: float):
    t = jnp.asarray(step, jnp.int32)
    # Last pruning step at or before t (clipped to [begin, end]).
    clipped = jnp.clip(t, begin, end)
    last = begin + ((clipped - begin) // every) * every
    frac = (last - begin).astype(jnp.float32) / jnp.float32(end - begin)
    weight = (1.0 - frac) ** 3  # 1 at begin_step, 0 at end_step
    # Written as an interpolation so both ends are exact in float32 (s_i at t0, s_f at the end).
    ramp = initial * weight + final * (1.0 - weight)
    return jnp.where(t < begin, jnp.float32(0.0), ramp.astype(jnp.float32))


def gmp_sparsity(
    step: Any,
    *,
    sparsity: float,
    begin_step: int,
    end_step: int,
    every: int = 1,
    initial_sparsity: float = 0.0,
) -> jax.Array:
    r"""Sparsity of the GMP mask in force at ``step`` (float32 scalar; jit-friendly).

    ``0`` before ``begin_step``; from then on :math:`s_{t_k}` of the module docstring at the
    last pruning step :math:`t_k \le t`, so it is constant between pruning steps and equals
    ``sparsity`` from ``end_step`` on. With ``every=1`` this is the cubic at every step, the
    curve to plot.

    Raises:
      TypeError / ValueError: as :func:`gmp` for the same arguments.
    """
    final, begin, end, dt, initial = _check_ramp(
        sparsity, begin_step, end_step, every, initial_sparsity
    )
    return _sparsity_at(step, final, begin, end, dt, initial)


def _survivor_scores(params: Any, masks: Any) -> Any:
    """``|w|`` on kept entries (at least the smallest normal float, so > 0), 0 on pruned ones.

    Ranking these scores ranks every kept weight above every pruned one, which makes the new
    mask a subset of the old one whatever the ties (exactly zero kept weights included).
    """

    def score(w, m):
        tiny = jnp.finfo(w.dtype).tiny
        return jnp.where(m, jnp.maximum(jnp.abs(w), tiny), jnp.zeros((), w.dtype))

    return jc_masks.map_masked(score, params, masks)


def gmp(
    inner: optax.GradientTransformation,
    *,
    sparsity: float,
    begin_step: int,
    end_step: int,
    every: int,
    initial_sparsity: float = 0.0,
    scope: str = "global",
    where: Callable[[tuple, Any], bool] = jc_masks.prunable,
    reference_ties: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Wraps ``inner`` in gradual magnitude pruning with the Zhu & Gupta cubic schedule.

    Pruning steps are ``begin_step, begin_step + every, ..., end_step``. For a pruning step
    :math:`t`, the mask :math:`m_t` keeps the ``ceil(N (1 - s_t))`` largest :math:`|\theta_t|`
    among the weights kept by :math:`m_{t-1}` (global or per layer), with :math:`s_t` from
    :func:`gmp_sparsity`. Every update runs ``inner`` on masked gradients and masked params and
    replaces the update by :math:`-\theta` off the mask, so pruned weights are exactly 0 after
    ``optax.apply_updates``.

    Args:
      inner: the optimizer to wrap (its extra ``update`` arguments are forwarded).
      sparsity: final sparsity :math:`s_f` in [0, 1).
      begin_step: :math:`t_0`, the first pruning step (>= 0).
      end_step: :math:`t_0 + n \Delta t`, the last pruning step (> ``begin_step``).
      every: :math:`\Delta t`, steps between pruning steps; must divide
        ``end_step - begin_step``.
      initial_sparsity: :math:`s_i` in [0, ``sparsity``], applied at ``begin_step``.
      scope: ``"global"`` (one threshold over all selected leaves) or ``"layer"``.
      where: selector of the prunable leaves (default :func:`jaxcompress.masks.prunable`).
      reference_ties: the IST-DASLab strict ``|w| > threshold`` rule instead of an exact count.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`GmpState`; ``update`` needs
      ``params``.

    Raises:
      TypeError: ``inner`` not an optax transformation, non-int steps, non-float sparsities,
        ``where`` not callable.
      ValueError: sparsities outside [0, 1) or ``initial_sparsity > sparsity``, ``end_step <=
        begin_step``, ``every`` not dividing ``end_step - begin_step``, unknown ``scope``.
    """
    inner = _support.check_inner(inner, "gmp")
    final, begin, end, dt, initial = _check_ramp(
        sparsity, begin_step, end_step, every, initial_sparsity
    )
    if scope not in _SCOPES:
        raise ValueError(f"scope: expected one of {_SCOPES}, got {scope!r}")
    _support.check_where(where)
    if not isinstance(reference_ties, bool):
        raise TypeError(f"reference_ties: expected a bool, got {reference_ties!r}")

    def compute_masks(scores: Any, s: Any) -> Any:
        return jc_masks.magnitude(
            scores, s, scope=scope, where=where, reference_ties=reference_ties
        )

    def is_pruning_step(t: jax.Array) -> jax.Array:
        return (t >= begin) & (t <= end) & ((t - begin) % dt == 0)

    def init_fn(params: optax.Params) -> GmpState:
        template = jax.eval_shape(lambda p: compute_masks(p, final), params)
        masks = _support.full_masks(params, template)
        inner_params = params
        if begin == 0 and initial > 0.0:
            masks = _support.place_masks(compute_masks(params, initial), params)
            inner_params = jc_masks.map_masked(_support.mask_leaf, params, masks)
        state = GmpState(
            count=jnp.zeros((), jnp.int32), masks=masks, inner_state=inner.init(inner_params)
        )
        return replicate_on_params_mesh(state, params)

    def update_fn(
        updates: optax.Updates, state: GmpState, params: optax.Params, extra_args: dict
    ) -> tuple[optax.Updates, GmpState]:
        step = state.count
        keep = state.masks
        inner_updates, inner_state = _support.masked_inner_update(
            inner, updates, state.inner_state, params, keep, extra_args
        )
        following = step + 1

        def prune(_):
            cancelled = _support.cancel_pruned(keep, inner_updates, params)
            upcoming = optax.apply_updates(params, cancelled)
            s = _sparsity_at(following, final, begin, end, dt, initial)
            return _support.intersect(compute_masks(_survivor_scores(upcoming, keep), s), keep)

        masks = lax.cond(is_pruning_step(following), prune, lambda _: keep, None)
        new_updates = _support.cancel_pruned(masks, inner_updates, params)
        return new_updates, GmpState(count=next_count(step), masks=masks, inner_state=inner_state)

    return transform_needing_params(
        init_fn, "gmp()", GmpState, "to compute masks and keep pruned weights at zero", update_fn
    )
