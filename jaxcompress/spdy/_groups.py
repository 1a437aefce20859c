r"""SPDY channel options on any Flax NNX model, built from its dependency groups.

A structured SPDY "layer" is a dependency group of :func:`jaxcompress.structure.groups` (a
channel of every layer that writes or reads it, across residual adds, norms and depthwise
convs), and its options are kept unit counts. Units are ranked by a group norm
(:func:`jaxcompress.prune.unit_scores`), so option ``k`` keeps the ``k`` best units and the
options of a group are nested.

**Additivity.** SPDY's DP (:func:`jaxcompress.spdy.solve`) needs the model's cost to be a sum
of per-layer terms. The multiply-adds of the model are a polynomial in the kept counts
(:func:`jaxcompress.structure.macs`): a conv that reads group ``a`` and writes group ``b``
costs ``c * k_a * k_b``. The layers of one table are therefore a set ``S`` of groups no
multiply-add term of which holds two (the structured counterpart of pairing each producer
with its consumer, ``experiments/spdy``); every other group stays whole. Then, exactly,

.. math:: \mathrm{MACs}(k) = F + \sum_{g \in S} t_g(k_g), \qquad
          t_g(k) = \mathrm{MACs}(k_g = k) - \mathrm{MACs}(k_g = 0),

with the other groups of ``S`` whole. By default ``S`` is the set of largest total dense
``t_g`` (a maximum-weight independent set of the graph whose edges join groups that share a
term).

**Errors.** ``e_g(k)`` is the normalised squared output error of the model with only group
``g`` cut to its ``k`` best units (their ``nnx.Param`` slices zeroed, as
:func:`jaxcompress.structure.zero`, which computes what the pruned model computes) on
calibration inputs: ``||f_k(x) - f(x)||^2 / ||f(x)||^2``. All of them come from one compiled
forward pass whose unit masks are arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcompress import _timing, structure
from jaxcompress._checks import check_fraction
from jaxcompress.spdy._tables import LayerOptions, TimingTable
from jaxcompress.structure._trace import Path, eval_view, forward_fn, key_path

__all__ = ["GroupOptions", "group_options"]

SCORES = ("l1", "l2")


def _eval_split(model: nnx.Module) -> tuple[Any, list[Path], list[Any], Any]:
    """``(graphdef, paths, leaves, treedef)`` of ``model`` in inference mode."""
    graphdef, state = nnx.split(eval_view(model))
    with_path, treedef = jax.tree_util.tree_flatten_with_path(state)
    return graphdef, [key_path(kp) for kp, _ in with_path], [x for _, x in with_path], treedef


def _params(group: structure.Group) -> list[structure.Slice]:
    return [m for m in group.members if issubclass(m.kind, nnx.Param)]


def unit_scores(
    model: nnx.Module, groups: Mapping[str, structure.Group], score: str = "l2"
) -> dict[str, np.ndarray]:
    r"""Group-norm importance of every unit of ``groups`` (``float64[size]`` per group).

    The score of unit ``u`` of group ``g`` gathers **every** ``nnx.Param`` slice the unit
    indexes: the output slices of the kernels that write it, their biases, the norm scale and
    bias on it, and the input rows of every kernel that reads it (running statistics are not
    parameters and do not count):

    * ``"l2"``: :math:`\sqrt{\sum_{m \in g} \|W_m[u]\|_2^2}`, the group L2 norm of DepGraph
      (Fang et al., CVPR 2023, group-level magnitude importance, aggregated by sum);
    * ``"l1"``: :math:`\sum_{m \in g} \|W_m[u]\|_1`; for a plain conv-conv pair this is the
      filter L1 norm of Li et al. ("Pruning Filters for Efficient ConvNets", ICLR 2017) plus
      the next layer's input rows, which Li et al. leave out.

    A unit that spans several indices of an axis (a head of ``head_dim`` columns) sums them.

    Args:
      model: the NNX model the groups were traced from.
      groups: ``{name: Group}``, e.g. ``jaxcompress.structure.groups(model, x)`` or part of it.
      score: ``"l2"`` or ``"l1"``.

    Raises:
      TypeError, ValueError: a model that is not an NNX module, ``groups`` not a mapping of
        :class:`jaxcompress.structure.Group`, an unknown ``score``.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    if not isinstance(score, str) or score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if not isinstance(groups, Mapping) or not all(
        isinstance(g, structure.Group) for g in groups.values()
    ):
        raise TypeError(f"groups must map names to jaxcompress.structure.Group, got {groups!r}")
    flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    out: dict[str, np.ndarray] = {}
    for name, group in groups.items():
        total = np.zeros(group.size, np.float64)
        for m in _params(group):
            w = np.asarray(flat[m.path][...], np.float64)
            w = np.abs(w) if score == "l1" else w * w
            per_index = np.moveaxis(w, m.axis, 0).reshape(w.shape[m.axis], -1).sum(axis=1)
            on = m.units >= 0
            total += np.bincount(m.units[on], weights=per_index[on], minlength=group.size)
        out[name] = np.sqrt(total) if score == "l2" else total
    return out


def top_units(scores: np.ndarray, count: int) -> np.ndarray:
    """Boolean mask of the ``count`` highest scores (ties to the lower index)."""
    keep = np.zeros(scores.shape[0], bool)
    keep[np.argsort(-scores, kind="stable")[:count]] = True
    return keep


def kept_count(fraction: float, size: int) -> int:
    """``ceil(fraction * size)`` (tolerating float round-off), at least 1."""
    return min(size, max(1, math.ceil(fraction * size - 1e-9)))


def check_score(score: Any) -> None:
    """``score`` is a name in :data:`SCORES` or a mapping (checked by :func:`check_scores`)."""
    if isinstance(score, str) and score not in SCORES:
        raise ValueError(
            f"score must be one of {SCORES} or a mapping of unit scores, got {score!r}"
        )
    if not isinstance(score, (str, Mapping)):
        raise TypeError(f"score must be one of {SCORES} or a mapping, got {type(score).__name__}")


def check_scores(
    score: Any, groups: Mapping[str, structure.Group], names: Sequence[str]
) -> dict[str, np.ndarray] | None:
    """Validate ``score``: a name in :data:`SCORES` (returns None) or a mapping of scores."""
    check_score(score)
    if isinstance(score, str):
        return None
    out = {}
    for name in names:
        if name not in score:
            raise ValueError(f"score has no unit scores for group {name!r}")
        s = np.asarray(score[name], np.float64)
        if s.shape != (groups[name].size,) or not np.all(np.isfinite(s)):
            raise ValueError(
                f"score[{name!r}] must be {groups[name].size} finite unit scores, got shape "
                f"{s.shape}"
            )
        out[name] = s
    return out


def _independent(mac: structure.MacCount, names: Sequence[str]) -> list[tuple[str, str]]:
    """Pairs of ``names`` that share a multiply-add term."""
    chosen = set(names)
    pairs = set()
    for key in mac.terms:
        inside = sorted(set(key) & chosen)
        pairs.update((a, b) for i, a in enumerate(inside) for b in inside[i + 1 :])
    return sorted(pairs)


def _heaviest_independent(mac: structure.MacCount, share: Mapping[str, int]) -> list[str]:
    """The set of groups, no two sharing a multiply-add term, of the largest total dense MAC
    share (maximum-weight independent set of the conflict graph, by branching on the vertex
    of highest degree; components of more than 40 groups fall back to greedy by
    ``share / (1 + degree)``). Returned in model order."""
    nodes = [n for n in share if share[n] > 0]
    adj: dict[str, set[str]] = {n: set() for n in nodes}
    for a, b in _independent(mac, nodes):
        adj[a].add(b)
        adj[b].add(a)

    def component(start: str, left: set[str]) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            for m in adj[todo.pop()] & left - seen:
                seen.add(m)
                todo.append(m)
        return seen

    def best(left: frozenset[str], memo: dict) -> tuple[int, frozenset[str]]:
        if left in memo:
            return memo[left]
        v = max(left, key=lambda n: (len(adj[n] & left), share[n]), default=None)
        if v is None or not adj[v] & left:  # no edges left: take every group
            out = (sum(share[n] for n in left), left)
        else:
            w_out, s_out = best(left - {v}, memo)
            w_in, s_in = best(left - adj[v] - {v}, memo)
            out = (w_in + share[v], s_in | {v}) if w_in + share[v] >= w_out else (w_out, s_out)
        memo[left] = out
        return out

    taken: set[str] = set()
    left = set(nodes)
    while left:
        comp = component(next(iter(left)), left)
        left -= comp
        if len(comp) <= 40:
            taken |= best(frozenset(comp), {})[1]
            continue
        for n in sorted(comp, key=lambda n: -share[n] / (1 + len(adj[n]))):
            if not adj[n] & taken:
                taken.add(n)
    return [n for n in share if n in taken]


@dataclasses.dataclass(frozen=True, eq=False)
class GroupOptions:
    """Per-group channel options of one model for SPDY (built by :func:`group_options`).

    Attributes:
      names: the table's layers: groups no multiply-add term of which holds two.
      counts: ``{name: (size, k_1, ...)}``, kept unit counts per option, option 0 whole.
      scores: ``{name: float64[size]}`` unit scores; option ``k`` keeps the ``k`` best.
      table: the exact MAC table (``t_g(k)`` in multiply-adds, ``base`` the dense model's).
      macs: the model's :class:`jaxcompress.structure.MacCount`.

    The model's parameters are read when :meth:`apply` or :meth:`errors` first needs them;
    build new options after changing the model.
    """

    model: nnx.Module
    inputs: tuple
    names: tuple[str, ...]
    counts: dict[str, tuple[int, ...]]
    scores: dict[str, np.ndarray]
    table: TimingTable
    macs: structure.MacCount
    groups: dict[str, structure.Group]
    _cache: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def _choice(self, choice: Sequence[int] | np.ndarray) -> np.ndarray:
        c = np.asarray(choice)
        if c.shape != (len(self.names),) or not np.issubdtype(c.dtype, np.integer):
            raise ValueError(
                f"choice must hold one option index per layer ({len(self.names)} ints), got "
                f"{choice!r}"
            )
        for name, j in zip(self.names, c, strict=True):
            if not 0 <= j < len(self.counts[name]):
                raise ValueError(
                    f"choice for {name!r} must be in [0, {len(self.counts[name])}), got {int(j)}"
                )
        return c

    def kept(self, choice: Sequence[int] | np.ndarray) -> dict[str, int]:
        """``{name: kept unit count}`` of a profile (one option index per layer)."""
        c = self._choice(choice)
        return {n: self.counts[n][int(j)] for n, j in zip(self.names, c, strict=True)}

    def keep(self, choice: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """``{name: bool[size]}``: a profile's masks, for :func:`jaxcompress.structure.prune`."""
        return {n: top_units(self.scores[n], k) for n, k in self.kept(choice).items()}

    def prune(self, choice: Sequence[int] | np.ndarray) -> nnx.Module:
        """The physically smaller model of a profile (:func:`jaxcompress.structure.prune`)."""
        return structure.prune(self.model, self.keep(choice), *self.inputs)

    def apply(self, choice: Sequence[int] | np.ndarray, *inputs) -> jax.Array:
        """``model(*inputs)`` in inference mode with the profile's dropped units zeroed (the
        function of :meth:`prune`'s model, without building it): one compiled pass for every
        profile, e.g. for the ``score_fn`` of :func:`jaxcompress.spdy.search`."""
        keep = self.keep(choice)
        masks = tuple(jnp.asarray(keep[n], jnp.float32) for n in self.names)
        return _masked_forward(self)(masks, *inputs)

    def errors(self, *inputs) -> list[np.ndarray]:
        """Per layer, ``e_g(k) = ||f_k(x) - f(x)||^2 / ||f(x)||^2`` with only group ``g`` cut to
        ``k`` units (module docstring); ``inputs`` are calibration inputs of the model."""
        fwd = _masked_forward(self)
        whole = tuple(jnp.ones(self.groups[n].size, jnp.float32) for n in self.names)
        ref = jax.tree.leaves(fwd(whole, *inputs))
        denom = sum(float(jnp.sum(jnp.square(r.astype(jnp.float32)))) for r in ref)
        out = []
        for i, name in enumerate(self.names):
            errs = []
            for k in self.counts[name]:
                masks = list(whole)
                masks[i] = jnp.asarray(top_units(self.scores[name], k), jnp.float32)
                y = jax.tree.leaves(fwd(tuple(masks), *inputs))
                num = sum(
                    float(jnp.sum(jnp.square((a - b).astype(jnp.float32))))
                    for a, b in zip(y, ref, strict=True)
                )
                errs.append(num / max(denom, 1e-30))
            out.append(np.asarray(errs))
        return out

    def measure(
        self,
        *inputs,
        repeats: int = 25,
        warmup: int = 3,
        clock: str = "wall",
        compiler_options: Mapping[str, Any] | None = None,
    ) -> TimingTable:
        r"""A table measured on the current device, in context (:func:`jaxcompress.spdy.measure`).

        ``base`` is the median time of the whole jitted model on ``inputs`` (inference mode);
        every option ``k < size`` of group ``g`` is timed as the physically pruned model with
        only ``g`` cut to ``k`` units, interleaved with and paired against the dense model:
        ``t_g(k) = t_g(size) + median_r[T_r(g at k) - T_r(dense)]`` (clipped at 0), where the
        dense entry ``t_g(size) = base * t^{MAC}_g(size) / MACs`` is the group's MAC share of
        the model's time (only differences matter to the DP's budget). Each entry is exact for
        a profile that cuts one group; check a few whole profiles end to end.
        """
        timer = _timing.Timer.of(repeats, warmup, clock, compiler_options)
        dense = _timed(self.model, inputs)
        calls: list[tuple[Any, tuple]] = [dense]
        plan: list[tuple[str, list[tuple[int, int]]]] = []
        for name in self.names:
            pairs = []
            for k in self.counts[name][1:]:
                keep = {name: top_units(self.scores[name], k)}
                small = structure.prune(self.model, keep, *self.inputs)
                calls += [dense, _timed(small, inputs)]
                pairs.append((len(calls) - 2, len(calls) - 1))
            plan.append((name, pairs))
        samples, _, _ = timer.run(calls)
        base = float(np.median(samples[[0, *(a for _, p in plan for a, _ in p)]]))
        dense_macs = float(self.table.base)
        layers = []
        for (name, pairs), mac_layer in zip(plan, self.table.layers, strict=True):
            t0 = base * float(mac_layer.times[0]) / dense_macs
            times, noise = [t0], [_timing.summary(samples[0])[1]]
            for ref, i in pairs:
                d, n = _timing.paired(samples[i], samples[ref])
                times.append(max(t0 + d, 0.0))
                noise.append(n)
            layers.append(LayerOptions(name, mac_layer.labels, np.array(times), np.array(noise)))
        prunable = float(sum(layer.times[0] for layer in layers))
        return TimingTable(base=max(base, prunable), prunable=prunable, layers=tuple(layers))


def _timed(model: nnx.Module, inputs: tuple) -> tuple[Any, tuple]:
    """``(fn, args)`` running ``model(*inputs)`` in inference mode from its state leaves."""
    fn, leaves, _, _ = forward_fn(model)
    return fn, (leaves, *inputs)


def _masked_forward(opts: GroupOptions):
    """``(masks, *inputs) -> model(*inputs)`` in inference mode, jitted once per
    :class:`GroupOptions`, with the layers' unit masks (float, one per name) multiplied into
    every ``nnx.Param`` slice of their units."""
    if "forward" in opts._cache:
        return opts._cache["forward"]
    graphdef, paths, leaves, treedef = _eval_split(opts.model)
    where = {p: i for i, p in enumerate(paths)}
    factors: list[tuple[int, int, int, np.ndarray]] = []  # (leaf, layer, axis, units)
    for j, name in enumerate(opts.names):
        for m in _params(opts.groups[name]):
            factors.append((where[m.path], j, m.axis, m.units))

    @jax.jit
    def fwd(leaves, masks, *inputs):
        new = list(leaves)
        for leaf, j, axis, units in factors:
            x = new[leaf]
            idx = jnp.asarray(np.clip(units, 0, None))
            f = jnp.where(jnp.asarray(units >= 0), masks[j][idx], 1.0).astype(x.dtype)
            shape = [1] * x.ndim
            shape[axis] = units.shape[0]
            new[leaf] = x * f.reshape(shape)
        return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, new))(*inputs)

    opts._cache["forward"] = functools.partial(fwd, leaves)
    return opts._cache["forward"]


def _check_levels(levels: Any) -> tuple[float, ...]:
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or not levels:
        raise TypeError(f"levels must be a non-empty sequence of kept fractions, got {levels!r}")
    out = tuple(
        check_fraction(f"levels[{i}]", f, what="a kept fraction") for i, f in enumerate(levels)
    )
    if out[0] != 1.0:
        raise ValueError(f"levels[0] must be 1.0 (option 0 is the whole group), got {levels[0]!r}")
    return out


def group_options(
    model: nnx.Module,
    *inputs,
    levels: Sequence[float] = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25),
    groups: Sequence[str] | None = None,
    score: str | Mapping[str, Any] = "l2",
) -> GroupOptions:
    """SPDY channel options of any NNX model, from its dependency groups (module docstring).

    Args:
      model: any ``flax.nnx.Module``.
      *inputs: example inputs (as :func:`jaxcompress.structure.groups`; a one-example batch
        gives per-example MACs in :attr:`GroupOptions.table`).
      levels: kept fractions, ``levels[0] == 1.0``; group ``g`` gets the distinct counts
        ``ceil(f * size_g)`` (at least 1) in this order.
      groups: the table's groups, prunable and sharing no multiply-add term; default: the
        prunable groups of largest total dense MAC share (module docstring).
      score: ``"l2"`` / ``"l1"`` group norms (:func:`jaxcompress.prune.unit_scores`) or
        ``{name: float[size]}``.

    Returns:
      A :class:`GroupOptions`: ``table`` in MACs (exact), ``measure(x)`` a measured table,
      ``errors(x)`` per-layer errors, ``keep`` / ``prune`` / ``apply`` a profile.

    Raises:
      TypeError, ValueError: bad ``levels``, ``score`` or ``groups`` (unknown, not prunable,
        repeated, or two sharing a multiply-add term, named with the pair), before any
        table is built; untraceable models as :func:`jaxcompress.structure.groups`.
    """
    fracs = _check_levels(levels)
    check_score(score)
    if groups is not None and (isinstance(groups, str) or not isinstance(groups, Sequence)):
        raise TypeError(f"groups must be a sequence of group names or None, got {groups!r}")
    all_groups = structure.groups(model, *inputs)
    mac = structure.macs(model, *inputs)
    dense = int(mac())
    if groups is None:
        share = {n: dense - int(mac({n: 0})) for n in mac.sizes}
        names = _heaviest_independent(mac, share)
        if not names:
            raise ValueError(f"{type(model).__name__} has no prunable group with multiply-adds")
    else:
        names = list(groups)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"groups must name distinct groups, got {groups!r}")
        for n in names:
            if n not in all_groups:
                raise ValueError(
                    f"groups names an unknown group {n!r}; the model's groups are "
                    f"{list(all_groups)}"
                )
            if not all_groups[n].prunable:
                raise ValueError(
                    f"group {n!r} is not prunable ({'; '.join(all_groups[n].reasons)})"
                )
        clash = _independent(mac, names)
        if clash:
            raise ValueError(
                f"groups {clash[0][0]!r} and {clash[0][1]!r} share multiply-adds (a layer reads "
                "one and writes the other), so a per-group table would not be additive; choose "
                f"groups that share none (all clashes: {clash})"
            )
    scores = check_scores(score, all_groups, names)
    if scores is None:
        assert isinstance(score, str)
        scores = unit_scores(model, {n: all_groups[n] for n in names}, score)
    counts, layers = {}, []
    for n in names:
        size = all_groups[n].size
        ks = tuple(dict.fromkeys(kept_count(f, size) for f in fracs))
        counts[n] = ks
        zero = int(mac({n: 0}))
        times = np.array([mac({n: k}) - zero for k in ks], np.float64)
        layers.append(LayerOptions(n, tuple(str(k) for k in ks), times))
    prunable = float(sum(layer.times[0] for layer in layers))
    table = TimingTable(base=float(dense), prunable=prunable, layers=tuple(layers))
    return GroupOptions(
        model, tuple(inputs), tuple(names), counts, scores, table, mac, dict(all_groups)
    )
