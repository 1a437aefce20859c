"""Extraction (threshold, policies, fold, prune), width policies and uniform-width baselines."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from jaxcompress.latency._cost import LatencyModel, per_example_macs
from jaxcompress.latency._quantize import Quantized, bit_cost, bits_of, plain_macs
from jaxcompress.latency._surrogate import (
    DEFAULT_TAU,
    check_multiple,
    check_tau,
    group_multiples,
)
from jaxcompress.structure import Gated, Group, MacCount, fold
from jaxcompress.structure import groups as structure_groups
from jaxcompress.structure import prune as structure_prune


@dataclasses.dataclass(frozen=True)
class PolicyContext:
    """What a width policy may read besides the kept counts.

    Attributes:
      sizes: ``{group: full unit count}`` of the groups being sized.
      gates: ``{group: gate values}`` (NumPy; all ones for :func:`uniform_width`).
      macs: per-example :class:`jaxcompress.structure.MacCount` of the (ungated) model.
      tau: the extraction threshold.
    """

    sizes: dict[str, int]
    gates: dict[str, np.ndarray]
    macs: MacCount
    tau: float


Policy = Callable[[dict[str, int], PolicyContext], dict[str, int]]


@dataclasses.dataclass(frozen=True)
class Extracted:
    """Result of :func:`extract`.

    Attributes:
      model: the physically smaller model (same classes, and train/eval mode, as the gated
        model's ``model``).
      keep: ``{group: boolean mask}`` of the kept units (for a bit group of a
        :class:`~jaxcompress.latency.Quantized` model: of the kept levels, a prefix).
      kept: ``{group: kept unit count}`` (bit groups: their bit-width), so that
        ``cost(kept) == macs`` for the cost the gates were trained against.
      macs: exact multiply-adds per example of ``model`` (``jaxcompress.structure.macs`` on
        one example); for a quantized model the bit-weighted count: each op's MACs times the
        bit-width of the kernel it reads (``levels`` for an unquantized one).
      bits: ``{bit group "<kernel path>:bits": kept bit-width}`` (empty unless quantized).
    """

    model: nnx.Module
    keep: dict[str, np.ndarray]
    kept: dict[str, int]
    macs: int
    bits: dict[str, int] = dataclasses.field(default_factory=dict)


def _policies(policy: Any) -> tuple[Policy, ...]:
    if callable(policy):
        return (policy,)
    if isinstance(policy, (str, bytes)) or not isinstance(policy, Sequence):
        raise TypeError(
            f"policy must be a callable (kept, ctx) -> kept or a sequence of them, got {policy!r}"
        )
    for i, p in enumerate(policy):
        if not callable(p):
            raise TypeError(f"policy[{i}] must be callable (kept, ctx) -> kept, got {p!r}")
    return tuple(policy)


def _apply(policies: tuple[Policy, ...], kept: dict[str, int], ctx: PolicyContext):
    for i, pol in enumerate(policies):
        out = pol(dict(kept), ctx)
        if not isinstance(out, Mapping) or set(out) != set(kept):
            got = sorted(out) if isinstance(out, Mapping) else type(out).__name__
            raise ValueError(
                f"policy[{i}] must return counts for exactly the groups {sorted(kept)}, got {got}"
            )
        for name, c in out.items():
            if isinstance(c, bool) or not isinstance(c, numbers.Integral):
                raise ValueError(f"policy[{i}] returned a non-int count {c!r} for {name!r}")
            if not 1 <= c <= ctx.sizes[name]:
                raise ValueError(
                    f"policy[{i}] returned count {c} for group {name!r}, outside "
                    f"[1, {ctx.sizes[name]}]"
                )
        kept = {n: int(c) for n, c in out.items()}
    return kept


def _ranking(a: np.ndarray) -> np.ndarray:
    """Indices of ``a`` from the largest entry down (ties: lower index first)."""
    return np.argsort(-a, kind="stable")


def _top_mask(a: np.ndarray, count: int) -> np.ndarray:
    mask = np.zeros(a.shape[0], bool)
    mask[_ranking(a)[:count]] = True
    return mask


def _gate_arrays(gated: Gated | Quantized) -> dict[str, np.ndarray]:
    """Every gate of ``gated`` as a float64 array, checked finite and non-negative."""
    gates = {n: np.asarray(g[...], np.float64) for n, g in gated.gates.items()}
    for name, a in gates.items():
        if not np.all(np.isfinite(a)) or (a < 0).any():
            raise ValueError(
                f"gates[{name!r}] must be finite and >= 0 to extract, got min {a.min()!r} "
                "(keep gates non-negative with jc.latency.project_nonnegative)"
            )
    return gates


def _extract_quantized(
    q: Quantized, inputs: tuple, tau: float, policies: tuple[Policy, ...]
) -> Extracted:
    gates = _gate_arrays(q)
    if not isinstance(q.model, Gated) and policies:
        raise ValueError(
            "policy sizes channel groups, but the quantized model has no channel gates "
            "(quantize(gated(model, x), x) has both)"
        )
    if not inputs:
        raise ValueError("inputs must hold at least one example input of the model, got none")
    bits = {n: bits_of(a, tau) for n, a in gates.items()}
    copy = nnx.clone(q)
    for name, b in bits.items():  # the dropped levels' gates are 0: same sum as the forward
        copy.gates[name][...] = copy.gates[name][...].at[b:].set(0.0)
    for var, value in copy._quantized():
        var[...] = value
    if isinstance(copy.model, Gated):
        channels = extract(copy.model, *inputs, tau=tau, policy=policies)
        model, keep, kept = channels.model, dict(channels.keep), dict(channels.kept)
    else:
        model, keep, kept = copy.model, {}, {}
    by_path = {path: bits[name] for name, path in q.kernels.items()}
    terms, sizes = bit_cost(plain_macs(model, inputs), q.levels, by_path)
    keep.update({n: np.arange(q.levels) < b for n, b in bits.items()})
    kept.update(bits)
    return Extracted(model, keep, kept, int(MacCount(terms, sizes)()), bits)


def extract(
    gated: Gated | Quantized,
    *inputs: Any,
    tau: float = DEFAULT_TAU,
    policy: Policy | Sequence[Policy] = (),
) -> Extracted:
    """The plain, physically smaller model that a gated model's gates select.

    1. **threshold**: a unit survives when its gate is ``>= tau * max`` of its group and
       ``> 0``; at least one unit (the largest gate) per group;
    2. **policies**: each maps the kept counts to new ones (:func:`round_to_multiple`,
       :func:`within_budget`, :func:`pad_to_fast`, or your own ``policy(kept, ctx)``), in order;
    3. the top-gate units of each group up to its count are kept (ties: lower index);
    4. :func:`jaxcompress.structure.fold` multiplies the gates into the weights and
       :func:`jaxcompress.structure.prune` removes the other units.

    Units kept beyond the threshold with gate 0 are zero padding: the extracted model computes
    the gated model's function whenever every removed gate is 0 (otherwise, up to the removed
    units' contributions: fine-tune).

    For a :class:`~jaxcompress.latency.Quantized` model (:func:`quantize`), each quantized
    kernel keeps ``b`` levels, ``b`` the index of its last level gate ``>= tau * max`` and
    ``> 0`` (at least 1); the later levels are dropped and the kept gates are folded in: the
    kernel becomes :math:`\\sum_{k \\le b} \\alpha_k s_k c_k(w)` (the ``b``-level quantizer when
    those gates are 1), so the extracted model computes ``q(x)`` with the dropped levels'
    gates set to 0. A gated inner model is then extracted as above (the policies act on its
    channel groups, with the plain MAC count in their context); ``macs`` is bit-weighted.

    Args:
      gated: a :class:`jaxcompress.structure.Gated` (e.g. from :func:`gated`) or a
        :class:`~jaxcompress.latency.Quantized`; not modified.
      *inputs: example inputs of the model (MACs are reported per example: the first example
        along the leading axis).
      tau: relative threshold in ``[0, 1)`` (default ``1e-2``).
      policy: a policy or a sequence of policies.

    Raises:
      TypeError: ``gated`` is not a ``structure.Gated`` or ``Quantized``; a bad ``policy``.
      ValueError: ``tau`` outside ``[0, 1)``; a negative or non-finite gate (named); no
        inputs; a policy returning bad counts, or a policy for a quantized model without
        channel gates; errors of ``structure.prune``.
    """
    if not isinstance(gated, (Gated, Quantized)):
        raise TypeError(
            f"gated must be a jaxcompress.structure.Gated (see jc.latency.gated) or a "
            f"jc.latency.Quantized, got {type(gated).__name__}"
        )
    tau = check_tau(tau)
    policies = _policies(policy)
    if isinstance(gated, Quantized):
        return _extract_quantized(gated, inputs, tau, policies)
    gates = _gate_arrays(gated)
    macs = per_example_macs(gated.model, inputs)
    sizes = {n: int(a.shape[0]) for n, a in gates.items()}
    kept = {}
    for name, a in gates.items():
        kept[name] = max(1, int(((a >= tau * a.max()) & (a > 0)).sum()))
    ctx = PolicyContext(sizes, gates, macs, tau)
    kept = _apply(policies, kept, ctx)
    keep = {n: _top_mask(gates[n], kept[n]) for n in gates}
    model = structure_prune(fold(gated), keep, *inputs)
    return Extracted(model, keep, kept, int(per_example_macs(model, inputs).dense))


def uniform_width(
    model: nnx.Module,
    scale: float,
    *inputs: Any,
    select: Callable[[str, Group], bool] | None = None,
    policy: Policy | Sequence[Policy] = (),
) -> nnx.Module:
    """``model`` with ``max(1, round(scale * size))`` units (the first ones) of every selected
    prunable group, by :func:`jaxcompress.structure.prune`: the uniform width-multiplier
    baseline (MobileNet style) when applied to a freshly initialised model. The kept weights
    keep the wide model's initial scale (drawn for the wide layer's fan-in); re-initialise the
    result if that matters (it does not under BatchNorm/LayerNorm).

    Args:
      model: any ``flax.nnx.Module``; not modified.
      scale: width multiplier in ``(0, 1]``.
      *inputs: example inputs.
      select: ``select(name, group) -> bool`` over the prunable groups (default: all).
      policy: policies as for :func:`extract` (``ctx.gates`` are ones).

    Raises:
      ValueError: ``scale`` outside ``(0, 1]``; no group selected; errors of
        ``structure.prune``.
    """
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < scale <= 1:
        raise ValueError(f"scale must be a float in (0, 1], got {scale!r}")
    if select is not None and not callable(select):
        raise TypeError(f"select must be callable (name, group) -> bool or None, got {select!r}")
    policies = _policies(policy)
    found = structure_groups(model, *inputs)
    names = [n for n, g in found.items() if g.prunable and (select is None or select(n, g))]
    if not names:
        raise ValueError(f"uniform_width: no prunable group of {type(model).__name__} selected")
    sizes = {n: found[n].size for n in names}
    kept = {n: max(1, round(float(scale) * s)) for n, s in sizes.items()}
    ctx = PolicyContext(
        sizes, {n: np.ones(s) for n, s in sizes.items()}, per_example_macs(model, inputs), 0.0
    )
    kept = _apply(policies, kept, ctx)
    keep = {n: np.arange(sizes[n]) < kept[n] for n in names}
    return structure_prune(model, keep, *inputs)


# --------------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------------


def _check_multiples(multiple: Any) -> None:
    if isinstance(multiple, Mapping):
        for n, m in multiple.items():
            check_multiple(m, f"multiple[{n!r}]")
    else:
        check_multiple(multiple)


def round_to_multiple(multiple: int | Mapping[str, int]) -> Policy:
    """Policy: round every count **up** to a multiple of ``multiple`` (capped at the group's
    size), or per group with ``{group: int}`` (others unchanged), for backends that run such
    channel counts faster than odd ones. The added units are the largest removed gates.

    Raises:
      ValueError: ``multiple`` not an int >= 1 (now); a mapping naming unknown groups (when
        applied).
    """
    _check_multiples(multiple)

    def policy(kept: dict[str, int], ctx: PolicyContext) -> dict[str, int]:
        ms = group_multiples(multiple, kept)
        return {n: min(ctx.sizes[n], -(-c // ms[n]) * ms[n]) for n, c in kept.items()}

    return policy


def within_budget(
    budget_macs: float,
    *,
    multiple: int | Mapping[str, int] = 1,
    criterion: str | Callable[[Mapping[str, np.ndarray]], float] = "gates",
) -> Policy:
    """Policy: lower counts, one step of ``multiple`` at a time, until the per-example MACs
    are at most ``budget_macs``.

    Each step lowers one group ``g`` to its next smaller multiple (never below
    ``min(multiple, size)``), the group whose step loses the least per MAC saved:

    .. math:: g^* = \\arg\\min_g
              \\frac{\\sum_{j \\in \\text{dropped}_g} \\alpha_{g,j} / \\max_k \\alpha_{g,k}}
              {\\text{MACs}(c) - \\text{MACs}(c - \\delta_g)}

    with the dropped units the smallest kept gates (``criterion="gates"``: gates relative to
    their group's largest, as the threshold is), or the increase of
    ``criterion(keep masks) -> float`` (e.g. a calibration loss, as SPDY measures errors).
    Zero gates go first; ties go to the larger saving. A last step can overshoot the budget by
    up to its own saving, so groups are then raised back, one step at a time and never above
    their given counts, the step that regains the most (relative gate mass, or loss decrease)
    per MAC added first, as long as the MACs stay within the budget.

    Raises:
      ValueError: a bad budget, multiple or criterion (now); the budget is below the cheapest
        model reachable with these multiples (when applied; the message gives that cost).
    """
    if (
        isinstance(budget_macs, bool)
        or not isinstance(budget_macs, numbers.Real)
        or not math.isfinite(float(budget_macs))
        or budget_macs <= 0
    ):
        raise ValueError(f"budget_macs must be a finite number > 0, got {budget_macs!r}")
    if not (criterion == "gates" or callable(criterion)):
        raise ValueError(
            f"criterion must be 'gates' or a callable(keep) -> float, got {criterion!r}"
        )
    _check_multiples(multiple)
    budget = float(budget_macs)

    def policy(kept: dict[str, int], ctx: PolicyContext) -> dict[str, int]:
        counts = dict(kept)
        multiples = group_multiples(multiple, counts)
        gates = {n: np.asarray(ctx.gates[n], np.float64) for n in counts}
        order = {n: _ranking(a) for n, a in gates.items()}
        cost = float(ctx.macs(counts))

        def masks(c: Mapping[str, int]) -> dict[str, np.ndarray]:
            return {n: _top_mask(gates[n], k) for n, k in c.items()}

        def mass(name: str, lo: int, hi: int) -> float:
            a = gates[name]
            top = a.max()
            return float(a[order[name][lo:hi]].sum() / (top if top > 0 else 1.0))

        current = None if isinstance(criterion, str) else float(criterion(masks(counts)))

        def best_step(moves, ok):
            """The move ``(group, new count)`` that ``ok(d_macs, d_loss)`` admits with the least
            loss change per MAC moved, ties to the larger MAC change down; None if none."""
            best = None
            for name, to in moves:
                trial = {**counts, name: to}
                d_macs = float(ctx.macs(trial)) - cost
                if criterion == "gates":
                    c = counts[name]
                    d_loss = mass(name, to, c) if to < c else -mass(name, c, to)
                    trial_loss = None
                else:
                    assert current is not None and callable(criterion)
                    trial_loss = float(criterion(masks(trial)))
                    d_loss = trial_loss - current
                if not ok(d_macs, d_loss):
                    continue
                key = (d_loss / max(abs(d_macs), 1e-12), d_macs)
                if best is None or key < best[0]:
                    best = (key, name, to, cost + d_macs, trial_loss)
            return best

        def lower(name: str) -> int:  # next multiple below the count (which may be the size)
            m = multiples[name]
            return -(-counts[name] // m) * m - m

        while cost > budget:
            moves = [
                (n, lower(n)) for n in counts if lower(n) >= max(1, min(multiples[n], ctx.sizes[n]))
            ]
            best = best_step(moves, lambda d_macs, d_loss: d_macs < 0)
            if best is None:
                raise ValueError(
                    f"budget_macs={budget_macs!r} is below the cheapest model with these "
                    f"multiples ({cost:.0f} MACs per example at counts {counts})"
                )
            _, name, to, cost, current = best
            counts[name] = to
        # Refill: a large last step can land well below the budget. Raise groups back, one
        # step at a time (never above the count the policy was given), the step that regains
        # the most per MAC first, while the cost stays within the budget; a step that regains
        # nothing is not taken.
        while True:
            up = {n: min(kept[n], c - c % multiples[n] + multiples[n]) for n, c in counts.items()}
            moves = [(n, to) for n, to in up.items() if to > counts[n]]
            best = best_step(
                moves, lambda d_macs, d_loss, cost=cost: cost + d_macs <= budget and d_loss < 0
            )
            if best is None:
                return counts
            _, name, to, cost, current = best
            counts[name] = to

    return policy


def pad_to_fast(lat: LatencyModel, *, min_gain: float = 0.0) -> Policy:
    """Policy: widen groups to the widths at which ``lat`` models the lowest latency among
    widths at least as large (:meth:`LatencyModel.fastest_widths`). A kernel can run faster at
    a wider width (XLA:CPU runs a 56-channel conv slower than a 64-channel one); the added
    units are the largest removed gates, zero padding when those are 0. Use the measured
    model, not its :meth:`~LatencyModel.monotone` envelope.

    Raises:
      TypeError: ``lat`` is not a LatencyModel. ValueError: ``min_gain`` outside ``[0, 1)``
        (now); a group whose size differs from ``lat``'s (when applied).
    """
    if not isinstance(lat, LatencyModel):
        raise TypeError(f"lat must be a LatencyModel, got {type(lat).__name__}")
    if isinstance(min_gain, bool) or not isinstance(min_gain, numbers.Real):
        raise ValueError(f"min_gain must be a float in [0, 1), got {min_gain!r}")
    if not 0 <= min_gain < 1:
        raise ValueError(f"min_gain must be a float in [0, 1), got {min_gain!r}")

    def policy(kept: dict[str, int], ctx: PolicyContext) -> dict[str, int]:
        for n in kept:
            if n in lat.sizes and lat.sizes[n] != ctx.sizes[n]:
                raise ValueError(
                    f"group {n!r} has {ctx.sizes[n]} units but the latency model was measured "
                    f"with {lat.sizes[n]}"
                )
        return lat.fastest_widths(kept, min_gain=min_gain)

    return policy
