r"""AC/DC: Alternating Compressed/DeCompressed training as an optax wrapper.

Peste, Iofinova, Vladu, Alistarh, "AC/DC: Alternating Compressed/DeCompressed Training of Deep
Neural Networks", NeurIPS 2021, arXiv:2106.12379; reference code IST-DASLab/ACDC.

Training alternates, on the timeline of an :class:`~jaxcompress.optim._schedule.AcdcSchedule`,
between dense phases (warm-up, decompressed) and compressed phases with a fixed sparse support.

* **Compressed phase start** (step :math:`t_c`): a new mask :math:`m` is computed by magnitude
  (Top-K of :math:`|\theta|`, global or per layer, or N:M) on the current weights
  :math:`\theta_{t_c}` and the pruned weights are set to exactly 0. AC/DC jumps straight to
  the target sparsity (no gradual ramp).
* **Compressed phase** (IHT-style fixed support): the inner optimizer sees the masked gradient
  :math:`m \odot g_t` and the masked params; pruned entries of the update are replaced by
  :math:`-\theta_t`, so :math:`\theta_{t+1} = m \odot (\theta_t + u_t)` exactly after
  ``optax.apply_updates`` (:func:`jaxcompress.optim._masked.masked`).
* **Decompressed phase start** (step :math:`t_d`): all weights are free again; the pruned ones
  restart from 0. The inner optimizer state is reset before the step (the reference's
  ``--reset_momentum_after_recycling``, set in every shipped run script).
* The **final compressed phase** gives the sparse model; the params at its start (the end of
  the last decompressed phase) are the dense half of the sparse-dense pair.

Timing of the mask. The reference pruner runs at the start of an epoch, before that epoch's
first forward pass, so the first compressed step already computes its gradient on the pruned
weights. To match this, the mask for step :math:`t_c` is computed at the end of update
:math:`t_c - 1`, from the parameters step :math:`t_c` will see
(:math:`\theta_{t_c} = \theta_{t_c-1} + u_{t_c-1}`), and that update already zeroes them. The
invariant is: ``state.masks`` is the mask in force at step ``state.count``, and when that step
is compressed the params handed to it are already zero off the mask. (When the schedule starts
compressed, ``warmup_steps == 0``, ``init`` computes the mask from the initial params and the
first update zeroes them; apply ``jaxcompress.masks.apply(params, state.masks)`` after ``init``
for a sparse first forward pass.)

Momentum at phase starts (reference parity). At a compressed-phase start the optimizer state
is **not** touched: the momentum of a freshly pruned weight decays geometrically under zero
gradients while its update is overridden to keep it at 0, as in the reference (whose SGD step
moves it and the post-step re-masking undoes that). At a decompressed-phase start the inner
state is reset to ``inner.init(params)`` leaf by leaf, see ``reset_inner_state``.

Everything is branch-free under ``jit``: the phase is a function of the step counter in the
state, masks are recomputed under ``lax.cond`` (only at phase starts does the Top-K run), the
inner-state reset is a ``jnp.where`` on a scalar predicate, so one compiled ``update`` serves
the whole schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxcompress import masks as jc_masks
from jaxcompress._checks import check_nm
from jaxcompress.masks._magnitude import check_sparsity
from jaxcompress.optim import _support
from jaxcompress.optim._placement import replicate_on_params_mesh
from jaxcompress.optim._schedule import AcdcSchedule
from jaxcompress.optim._util import next_count, transform_needing_params

__all__ = ["AcdcState", "acdc", "moment_leaves"]

_SCOPES = ("global", "layer", "nm")
_RESET_MODES = ("moments", "all", "none")

ResetSelector = Callable[[tuple, Any], bool]


class AcdcState(NamedTuple):
    """State of :func:`acdc`.

    Attributes:
      count: int32 number of updates applied so far; the schedule's phase at step ``count`` is
        the phase of the next update.
      masks: mask tree in force at step ``count`` (bool arrays, ``True`` = kept, ``None`` for
        unpruned leaves; all ``True`` before the first compressed phase). During decompressed
        phases it holds the previous mask, which is not applied.
      inner_state: state of the wrapped optimizer.
      mask_hamming: int32 number of entries whose mask value changed at the most recent mask
        update (the reference's ``pruned_masks_similarity``; the first mask is compared with
        all-kept, so it equals the number of pruned entries).
    """

    count: jax.Array
    masks: Any
    inner_state: optax.OptState
    mask_hamming: jax.Array


# ----------------------------------------------------------------------------- helpers


def moment_leaves(path: tuple, leaf: Any) -> bool:
    """Default reset selector: floating-point state leaves, except injected hyperparameters.

    Selects every leaf with an inexact dtype (momentum ``trace``, Adam ``mu``/``nu``,
    Adafactor factors, ...) unless its key path goes through a field named ``hyperparams``
    (``optax.inject_hyperparams`` keeps the current hyperparameter values there). Integer
    leaves are never selected: step counters of schedules (``scale_by_schedule``,
    ``inject_hyperparams``) and Adam's bias-correction ``count`` keep running.
    """
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
        return False
    return not any(
        isinstance(key, jax.tree_util.GetAttrKey) and key.name == "hyperparams" for key in path
    )


def _all_leaves(path: tuple, leaf: Any) -> bool:
    del path
    return hasattr(leaf, "dtype")


def reset_selector(value: Any, argname: str = "reset_inner_state") -> ResetSelector | None:
    """Turns a ``reset_inner_state`` option into a leaf selector (None: never reset)."""
    if isinstance(value, str):
        modes = {"moments": moment_leaves, "all": _all_leaves, "none": None}
        if value in modes:
            return modes[value]
    elif value is True:
        return moment_leaves
    elif value is False or value is None:
        return None
    elif callable(value):
        return value
    raise ValueError(
        f"{argname}: expected True, False, one of {_RESET_MODES} or a callable "
        f"(path, leaf) -> bool, got {value!r}"
    )


def reset_leaves(state: Any, fresh: Any, reset: jax.Array, selector: ResetSelector | None) -> Any:
    """``where(reset, fresh, state)`` on every leaf chosen by ``selector``; others unchanged.

    ``fresh`` must have the structure of ``state`` (``inner.init(params)``). Leaves keep the
    dtype of ``state``, so the result can be fed back into a jitted function without
    recompiling.
    """
    if selector is None:
        return state
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    fresh_leaves = treedef.flatten_up_to(fresh)
    out = []
    for (path, old), new in zip(leaves, fresh_leaves, strict=True):
        if hasattr(old, "dtype") and selector(path, old):
            new = jnp.asarray(new).astype(old.dtype)
            out.append(jnp.where(reset, new, old))
        else:
            out.append(old)
    return jax.tree_util.tree_unflatten(treedef, out)


def _mask_fn(
    sparsity: Any, scope: str, nm: tuple[int, int], where: Any, reference_ties: bool
) -> Callable[[Any], Any]:
    if scope == "nm":
        n, m = nm
        return lambda params: jc_masks.nm(params, n, m, where=where)
    return lambda params: jc_masks.magnitude(
        params, sparsity, scope=scope, where=where, reference_ties=reference_ties
    )


def _check_nm(nm: Any) -> tuple[int, int]:
    """``nm`` as a pair ``(n, m)`` with the rule of :func:`jaxcompress.masks.nm` (1 <= n < m)."""
    if isinstance(nm, str | bytes) or not isinstance(nm, Sequence) or len(nm) != 2:
        raise TypeError(f"nm: expected a pair (n, m) of ints with 1 <= n < m, got {nm!r}")
    return check_nm(*nm, argname="nm")


# ----------------------------------------------------------------------------- transform


def acdc(
    inner: optax.GradientTransformation,
    *,
    sparsity: Any,
    schedule: AcdcSchedule,
    scope: str = "global",
    nm: tuple[int, int] = (2, 4),
    reset_inner_state: bool | str | ResetSelector = True,
    where: Callable[[tuple, Any], bool] = jc_masks.prunable,
    reference_ties: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Wraps ``inner`` in AC/DC alternating compressed/decompressed training.

    With schedule predicates :math:`c(t)` (compressed), :math:`s(t)` (compressed-phase start),
    :math:`d(t)` (decompressed-phase start), mask :math:`m_t` and keep set
    :math:`k_t = m_t \lor \lnot c(t)`, update :math:`t` does

    .. math::

        S_t &\leftarrow \mathrm{init}(\theta_t) \text{ on reset leaves if } d(t), \\
        (u_t, S_{t+1}) &= U(k_t \odot g_t,\ S_t,\ k_t \odot \theta_t), \\
        m_{t+1} &= \mathrm{TopK}_{\text{sparsity}}\big(|\theta_t + k_t \odot u_t|\big)
            \text{ if } s(t+1) \text{ else } m_t, \\
        \Delta_t &= u_t \text{ where } k_t \land k_{t+1}, \quad -\theta_t \text{ elsewhere},

    so ``optax.apply_updates(params, updates)`` is exactly 0 at every pruned entry of every
    compressed step, for any ``inner`` (sgd, momentum, adamw, ...). See the module docstring
    for why the mask of step :math:`t+1` is taken at the end of update :math:`t`.

    Args:
      inner: the optimizer to wrap (its extra ``update`` arguments are forwarded).
      sparsity: fraction of the selected weights pruned in compressed phases, in [0, 1): a
        float, a scalar array, or (``scope="layer"``) a per-leaf tree as accepted by
        :func:`jaxcompress.masks.magnitude`. With ``scope="nm"`` pass ``None`` or
        ``1 - n/m``.
      schedule: the phase timeline in steps, from
        :func:`~jaxcompress.optim._schedule.acdc_schedule` or
        :func:`~jaxcompress.optim._schedule.acdc_schedule_from_epochs`.
      scope: ``"global"`` (one magnitude threshold over all selected leaves; the reference
        default ``UnstructuredMagnitudePruner``), ``"layer"`` (per-leaf threshold,
        ``MagnitudePruner``) or ``"nm"`` (``MagnitudeNMPruner``).
      nm: ``(n, m)`` for ``scope="nm"``: keep ``n`` of every ``m`` along the contracting axis.
      reset_inner_state: what to reset to ``inner.init(params)`` at each decompressed-phase
        start. ``True``/``"moments"`` (default, the reference's momentum reset): the floating
        leaves of the inner state (:func:`moment_leaves`), keeping integer step counters and
        ``inject_hyperparams`` values, so learning-rate schedules inside ``inner`` do not
        restart. Note that Adam's bias-correction ``count`` is kept too, so the first steps
        after a reset are not bias-corrected (with default betas the first one is about
        ``(1 - b1) / sqrt(1 - b2) ~ 3.2`` times a steady-state step). ``"all"``: every leaf,
        counters included (restarts Adam's bias correction, but also any schedule counter
        inside ``inner``). ``False``/``"none"``: no reset. A callable ``(path, leaf) -> bool``
        chooses the leaves itself.
      where: selector of the prunable leaves (default :func:`jaxcompress.masks.prunable`:
        conv/dense kernels; biases and norms stay dense, as the reference's ``weight_only``).
      reference_ties: use the reference's strict ``|w| > threshold`` rule (keeps one entry
        fewer without ties) instead of exactly ``ceil(N (1 - s))`` kept.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`AcdcState`; ``update`` needs
      ``params``.

    Raises:
      TypeError: ``inner`` not an optax transformation, ``schedule`` not an
        :class:`AcdcSchedule`, ``where`` not callable, a sparsity of the wrong type, ``nm``
        not a pair of ints.
      ValueError: unknown ``scope``, sparsity outside [0, 1) or inconsistent with ``nm``, an
        ``nm`` outside ``1 <= n < m``, an unknown ``reset_inner_state``. ``init`` raises if the
        mask function rejects the params (e.g. N:M on a leaf whose contracting axis is not a
        multiple of ``m``).
    """
    inner = _support.check_inner(inner, "acdc")
    if not isinstance(schedule, AcdcSchedule):
        raise TypeError(
            f"schedule: expected an AcdcSchedule (see acdc_schedule / acdc_schedule_from_epochs), "
            f"got {type(schedule).__name__} {schedule!r}"
        )
    if scope not in _SCOPES:
        raise ValueError(f"scope: expected one of {_SCOPES}, got {scope!r}")
    n_m = _check_nm(nm)
    if scope == "nm":
        target = 1.0 - n_m[0] / n_m[1]
        if sparsity is not None and (
            not isinstance(sparsity, int | float) or abs(float(sparsity) - target) > 1e-9
        ):
            raise ValueError(
                f"sparsity: with scope='nm' and nm={n_m} the sparsity is 1 - n/m = {target}; "
                f"pass None or {target}, got {sparsity!r}"
            )
    elif sparsity is None:
        raise ValueError(f"sparsity: expected a value in [0, 1) for scope={scope!r}, got None")
    elif isinstance(sparsity, int | float | jax.Array):
        sparsity = check_sparsity(sparsity)
    elif scope != "layer":
        raise ValueError(
            f"sparsity: a per-leaf sparsity tree needs scope='layer', got scope={scope!r}"
        )
    _support.check_where(where)
    if not isinstance(reference_ties, bool):
        raise TypeError(f"reference_ties: expected a bool, got {reference_ties!r}")
    selector = reset_selector(reset_inner_state)
    compute_masks = _mask_fn(sparsity, scope, n_m, where, reference_ties)

    def init_fn(params: optax.Params) -> AcdcState:
        template = jax.eval_shape(compute_masks, params)  # validates the params, no work
        if schedule.warmup_steps == 0:  # step 0 starts a compressed phase
            masks = _support.place_masks(compute_masks(params), params)
            ones = _support.full_masks(params, template)
            ham = _support.hamming(masks, ones)
            inner_params = jc_masks.map_masked(_support.mask_leaf, params, masks)
        else:
            masks = _support.full_masks(params, template)
            ham = jnp.zeros((), jnp.int32)
            inner_params = params
        state = AcdcState(
            count=jnp.zeros((), jnp.int32),
            masks=masks,
            inner_state=inner.init(inner_params),
            mask_hamming=jnp.asarray(ham, jnp.int32),
        )
        return replicate_on_params_mesh(state, params)

    def update_fn(
        updates: optax.Updates, state: AcdcState, params: optax.Params, extra_args: dict
    ) -> tuple[optax.Updates, AcdcState]:
        step = state.count
        keep = _support.keep_where(state.masks, schedule.is_compressed(step))
        inner_state = state.inner_state
        if selector is not None:
            inner_state = reset_leaves(
                inner_state,
                inner.init(params),
                schedule.is_decompressed_phase_start(step),
                selector,
            )
        inner_updates, inner_state = _support.masked_inner_update(
            inner, updates, inner_state, params, keep, extra_args
        )

        following = step + 1

        def new_masks(_):
            cancelled = _support.cancel_pruned(keep, inner_updates, params)
            upcoming = optax.apply_updates(params, cancelled)
            fresh = compute_masks(upcoming)
            return fresh, _support.hamming(fresh, state.masks)

        def same_masks(_):
            return state.masks, state.mask_hamming

        masks, ham = lax.cond(
            schedule.is_compressed_phase_start(following), new_masks, same_masks, None
        )
        kept_next = _support.keep_where(masks, schedule.is_compressed(following))
        keep_both = _support.intersect(keep, kept_next)
        new_updates = _support.cancel_pruned(keep_both, inner_updates, params)
        new_state = AcdcState(
            count=next_count(step),
            masks=masks,
            inner_state=inner_state,
            mask_hamming=ham,
        )
        return new_updates, new_state

    return transform_needing_params(
        init_fn, "acdc()", AcdcState, "to compute masks and keep pruned weights at zero", update_fn
    )
