"""A measured latency model of any traced NNX model, and end-to-end latency.

:func:`measure_latency_model` times every ``dot_general`` and convolution of the model's traced
forward pass (:attr:`jaxcompress.structure.MacCount.ops`) on the current device, on a grid of
kept unit counts of the groups that op depends on; :class:`LatencyModel` interpolates those
tables multilinearly, so the modelled latency is differentiable in (relaxed) counts.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcompress._timing import time_callable
from jaxcompress.structure import MacCount
from jaxcompress.structure import macs as structure_macs

_FORMAT = "jaxcompress.latency.LatencyModel"
_VERSION = 1
_LABEL_RE = re.compile(r"^(.+)=(\d+)$")
_MAX_POINTS = 4096


def first_example(inputs: Sequence[Any]) -> tuple:
    """Each input restricted to its first example along the leading (batch) axis."""
    out = []
    for x in inputs:
        shape = tuple(getattr(x, "shape", ()))
        if not shape:
            raise ValueError(
                f"inputs must be arrays with a leading batch axis, got one of shape {shape}"
            )
        out.append(jax.ShapeDtypeStruct((1, *shape[1:]), x.dtype))
    return tuple(out)


def per_example_macs(model: nnx.Module, inputs: Sequence[Any]) -> MacCount:
    """:func:`jaxcompress.structure.macs` on one example of ``inputs``."""
    if not inputs:
        raise ValueError("inputs must hold at least one example input of the model, got none")
    return structure_macs(model, *first_example(inputs))


def _interp_axis(xs: np.ndarray, v):
    """Index of the left grid point and the (unclipped) fraction: linear extrapolation."""
    n = xs.shape[0]
    xs_j = jnp.asarray(xs, jnp.float32)
    i = jnp.clip(jnp.searchsorted(xs_j, v, side="right") - 1, 0, n - 2)
    t = (v - xs_j[i]) / (xs_j[i + 1] - xs_j[i])
    return i, t


def _multilinear(axes: tuple[np.ndarray, ...], table: np.ndarray, point: Sequence[Any]):
    """Multilinear interpolation (linear extrapolation outside the grid, floored at 0)."""
    tab = jnp.asarray(table, jnp.float32)
    live = [k for k, xs in enumerate(axes) if xs.shape[0] > 1]
    idx = [jnp.zeros((), jnp.int32)] * len(axes)
    frac: list[Any] = [None] * len(axes)
    for k in live:
        idx[k], frac[k] = _interp_axis(axes[k], jnp.asarray(point[k], jnp.float32))
    total = jnp.zeros((), jnp.float32)
    for corner in itertools.product((0, 1), repeat=len(live)):
        w = jnp.ones((), jnp.float32)
        pos = list(idx)
        for k, c in zip(live, corner, strict=True):
            w = w * (frac[k] if c else 1.0 - frac[k])
            pos[k] = idx[k] + c
        total = total + w * tab[tuple(pos)]
    return jnp.maximum(total, 0.0)


Term = tuple[str, tuple[str, ...], tuple[np.ndarray, ...], np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class LatencyModel:
    """Modelled latency as a function of the kept unit counts of a model's groups.

    .. math::  T(c) = T_{\\text{overhead}} + \\sum_t T_t(c_{g_{t,1}}, \\dots, c_{g_{t,k}})

    where each term ``t`` (one ``dot_general`` / convolution of the traced forward pass) has a
    table of measured times on a grid of widths of the groups its shapes depend on,
    interpolated multilinearly (linear extrapolation outside the grid, floored at 0), hence
    differentiable almost everywhere in relaxed counts. Build with
    :func:`measure_latency_model`; store with :meth:`save` / :meth:`load` (JSON) or
    :meth:`to_table` / :meth:`from_table` (a SPDY ``TimingTable``).

    Attributes:
      terms: ``(name, groups, axes, times)`` per term: the group names, one sorted grid of
        widths per group (each including the group's full size) and a ``len(axes[0]) x ...``
        array of seconds.
      sizes: full unit count of every group the model varies.
      overhead: seconds outside the terms (>= 0).
    """

    terms: tuple[Term, ...]
    sizes: dict[str, int]
    overhead: float = 0.0

    def __post_init__(self):
        if not isinstance(self.sizes, Mapping):
            raise TypeError(f"sizes must map group names to sizes, got {self.sizes!r}")
        if not math.isfinite(float(self.overhead)) or self.overhead < 0:
            raise ValueError(f"overhead must be finite and >= 0, got {self.overhead!r}")
        terms = []
        names = set()
        for term in self.terms:
            name, groups, axes, times = term
            if name in names:
                raise ValueError(f"two terms are named {name!r}")
            names.add(name)
            groups = tuple(groups)
            axes = tuple(np.asarray(a, np.float64) for a in axes)
            times = np.asarray(times, np.float64)
            if len(groups) != len(axes):
                raise ValueError(f"term {name!r}: {len(groups)} groups but {len(axes)} axes")
            for g, a in zip(groups, axes, strict=True):
                if g not in self.sizes:
                    raise ValueError(f"term {name!r} names group {g!r}, not in sizes")
                if a.ndim != 1 or a.size == 0 or np.any(np.diff(a) <= 0):
                    raise ValueError(f"term {name!r}: the grid of {g!r} must increase, got {a}")
                if a[-1] != self.sizes[g]:
                    raise ValueError(
                        f"term {name!r}: the grid of {g!r} must end at its size "
                        f"{self.sizes[g]}, got {a}"
                    )
            if times.shape != tuple(a.shape[0] for a in axes):
                raise ValueError(f"term {name!r}: times shape {times.shape} != grid {axes}")
            if not np.all(np.isfinite(times)) or np.any(times < 0):
                raise ValueError(f"term {name!r}: times must be finite and >= 0")
            terms.append((name, groups, axes, times))
        object.__setattr__(self, "terms", tuple(terms))
        object.__setattr__(self, "sizes", {k: int(v) for k, v in self.sizes.items()})
        dense = float(self.overhead) + sum(float(t[3][(-1,) * t[3].ndim]) for t in terms)
        object.__setattr__(self, "_dense", dense)

    @property
    def dense(self) -> float:
        """Modelled full-width latency in seconds (a Python float, also inside a trace)."""
        return self._dense  # type: ignore[attr-defined]

    def __call__(self, kept: Mapping[str, Any] | None = None):
        """Modelled latency (seconds) at ``kept`` (``{group: count}``, ints or traced floats;
        groups not named at full size)."""
        kept = {} if kept is None else kept
        if not isinstance(kept, Mapping):
            raise TypeError(f"kept must map group names to counts, got {type(kept).__name__}")
        unknown = sorted(set(kept) - set(self.sizes))
        if unknown:
            raise ValueError(
                f"kept names groups {unknown} that the latency model does not vary; its groups "
                f"are {list(self.sizes)}"
            )
        total = jnp.asarray(self.overhead, jnp.float32)
        for _, groups, axes, times in self.terms:
            if not groups:
                total = total + jnp.asarray(times.reshape(()), jnp.float32)
                continue
            point = [kept.get(g, self.sizes[g]) for g in groups]
            total = total + _multilinear(axes, times, point)
        return total

    def grid(self, name: str) -> tuple[int, ...]:
        """All measured widths of group ``name`` (over every term)."""
        out = {self.sizes[name]}
        for _, groups, axes, _ in self.terms:
            for g, a in zip(groups, axes, strict=True):
                if g == name:
                    out.update(int(w) for w in a)
        return tuple(sorted(out))

    def monotone(self) -> LatencyModel:
        """Every table replaced by its lower envelope over wider widths,
        :math:`\\tilde T_t(c) = \\min_{c' \\ge c} T_t(c')` (componentwise over the grid), so no
        term gets faster as a layer gets wider. A layer can always be zero-padded to a wider,
        faster width with the same function (:func:`~jaxcompress.latency.pad_to_fast`), so the
        envelope is attainable (measured grids need not be monotone in width)."""
        terms = []
        for name, groups, axes, times in self.terms:
            env = np.asarray(times, np.float64)
            for axis in range(env.ndim):
                env = np.flip(np.minimum.accumulate(np.flip(env, axis), axis=axis), axis)
            terms.append((name, groups, axes, env))
        return LatencyModel(tuple(terms), self.sizes, self.overhead)

    def fastest_widths(
        self, counts: Mapping[str, int], *, min_gain: float = 0.0, max_combinations: int = 65536
    ) -> dict[str, int]:
        """The widths ``c' >= counts`` (over ``counts`` and the wider grid widths) at which the
        modelled latency is lowest; ties go to the narrower model. Exhaustive up to
        ``max_combinations`` combinations, else coordinate descent. Returns ``counts`` unless
        the latency drops by at least the fraction ``min_gain`` (in ``[0, 1)``). Groups of
        ``counts`` the model does not vary are returned unchanged."""
        if not isinstance(counts, Mapping):
            raise TypeError(f"counts must map group names to ints, got {counts!r}")
        for g, c in counts.items():
            size = self.sizes.get(g)
            if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1:
                raise ValueError(f"counts[{g!r}] must be an int >= 1, got {c!r}")
            if size is not None and c > size:
                raise ValueError(f"counts[{g!r}] must be at most {size}, got {c!r}")
        if isinstance(min_gain, bool) or not isinstance(min_gain, numbers.Real):
            raise ValueError(f"min_gain must be a float in [0, 1), got {min_gain!r}")
        if not 0 <= min_gain < 1:
            raise ValueError(f"min_gain must be a float in [0, 1), got {min_gain!r}")
        names = [g for g in counts if g in self.sizes]
        out = {g: int(c) for g, c in counts.items()}
        if not names:
            return out
        candidates = {
            g: np.array([counts[g]] + [w for w in self.grid(g) if w > counts[g]], np.float32)
            for g in names
        }
        latency = jax.jit(jax.vmap(self.__call__))

        def best(combos: dict[str, np.ndarray]) -> dict[str, int]:
            times = np.asarray(latency({g: jnp.asarray(v) for g, v in combos.items()}))
            total = sum(combos.values())
            i = int(np.lexsort((np.asarray(total), times))[0])  # fastest, then narrowest
            return {g: int(combos[g][i]) for g in names}

        if math.prod(len(v) for v in candidates.values()) <= max_combinations:
            mesh = np.meshgrid(*candidates.values(), indexing="ij")
            choice = best({g: m.ravel() for g, m in zip(names, mesh, strict=True)})
        else:
            choice = {g: int(counts[g]) for g in names}
            for _ in range(len(names) * max(len(v) for v in candidates.values())):
                before = dict(choice)
                for g in names:
                    others = {h: np.full(len(candidates[g]), choice[h], np.float32) for h in names}
                    choice = best({**others, g: candidates[g]})
                if choice == before:
                    break
        start = float(self({g: float(counts[g]) for g in names}))
        faster = float(self({g: float(w) for g, w in choice.items()}))
        if faster > (1.0 - min_gain) * start:
            return out
        return {**out, **choice}

    # ------------------------------------------------------------------ storage

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "sizes": dict(self.sizes),
            "overhead": float(self.overhead),
            "terms": [
                {
                    "name": name,
                    "groups": list(groups),
                    "axes": [a.tolist() for a in axes],
                    "times": times.tolist(),
                }
                for name, groups, axes, times in self.terms
            ],
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the model as JSON to ``path`` atomically."""
        from jaxcompress.checkpoint import write_json_atomic

        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyModel:
        """Inverse of :meth:`save`."""
        with open(os.fspath(path)) as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise ValueError(f"{os.fspath(path)!r} is not a saved LatencyModel (format {_FORMAT})")
        if doc.get("version") != _VERSION:
            raise ValueError(f"{os.fspath(path)!r}: unsupported version {doc.get('version')!r}")
        terms = tuple(
            (
                t["name"],
                tuple(t["groups"]),
                tuple(np.asarray(a, np.float64) for a in t["axes"]),
                np.asarray(t["times"], np.float64),
            )
            for t in doc["terms"]
        )
        return cls(terms, dict(doc["sizes"]), float(doc["overhead"]))

    def to_table(self):
        """A :class:`jaxcompress.spdy.TimingTable`: one layer per term, labels
        ``"g1=16,g2=32"`` (``"dense"`` for a term without groups), option 0 = full width."""
        from jaxcompress.spdy import LayerOptions, TimingTable

        layers = []
        for name, groups, axes, times in self.terms:
            combos = list(itertools.product(*[range(a.shape[0]) for a in axes]))
            combos.sort(key=lambda c: tuple(-i for i in c))
            labels = [
                ",".join(
                    f"{g}={int(axes[k][i])}" for k, (g, i) in enumerate(zip(groups, c, strict=True))
                )
                or "dense"
                for c in combos
            ]
            layers.append(
                LayerOptions(name, tuple(labels), np.array([float(times[c]) for c in combos]))
            )
        prunable = float(sum(layer.times[0] for layer in layers))
        return TimingTable(base=prunable + self.overhead, prunable=prunable, layers=tuple(layers))

    @classmethod
    def from_table(cls, table: Any, sizes: Mapping[str, int]) -> LatencyModel:
        """Inverse of :meth:`to_table`; ``sizes`` gives the groups' full sizes."""
        terms = []
        for layer in table.layers:
            points: dict[tuple[int, ...], float] = {}
            groups: tuple[str, ...] | None = None
            for label, time in zip(layer.labels, layer.times, strict=True):
                if label == "dense":
                    key_groups: tuple[str, ...] = ()
                    key: tuple[int, ...] = ()
                else:
                    parts = [_LABEL_RE.match(p) for p in label.split(",")]
                    if any(m is None for m in parts):
                        raise ValueError(f"layer {layer.name!r}: cannot parse label {label!r}")
                    key_groups = tuple(m[1] for m in parts if m is not None)
                    key = tuple(int(m[2]) for m in parts if m is not None)
                if groups is not None and key_groups != groups:
                    raise ValueError(f"layer {layer.name!r}: labels name different groups")
                groups = key_groups
                points[key] = float(time)
            groups = groups or ()
            axes = tuple(
                np.array(sorted({p[k] for p in points}), np.float64) for k in range(len(groups))
            )
            times = np.empty(tuple(a.shape[0] for a in axes))
            for pos in itertools.product(*[range(a.shape[0]) for a in axes]):
                key = tuple(int(axes[k][i]) for k, i in enumerate(pos))
                if key not in points:
                    raise ValueError(f"layer {layer.name!r}: the grid misses point {key}")
                times[pos] = points[key]
            terms.append((layer.name, groups, axes, times))
        return cls(tuple(terms), dict(sizes), max(0.0, table.base - table.prunable))


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def _grid_widths(size: int, grid: Sequence[float]) -> tuple[int, ...]:
    return tuple(sorted({max(1, min(size, round(m * size))) for m in grid} | {size}))


def _operands(shapes, dtypes, seed: int) -> tuple:
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    out = []
    for k, shape, dtype in zip(keys, shapes, dtypes, strict=True):
        if jnp.issubdtype(dtype, jnp.floating):
            out.append(jax.random.normal(k, shape, dtype))
        else:
            out.append(jnp.ones(shape, dtype))
    return tuple(out)


def _forward(model: nnx.Module):
    view = nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)
    graphdef, state = nnx.split(view)

    def forward(state, *inputs):
        return nnx.merge(graphdef, state)(*inputs)

    return forward, state


def _concrete(inputs: Sequence[Any]) -> tuple:
    out = []
    for i, x in enumerate(inputs):
        if isinstance(x, jax.ShapeDtypeStruct):
            if jnp.issubdtype(x.dtype, jnp.floating):
                x = jax.random.normal(jax.random.key(i), x.shape, x.dtype)
            else:
                x = jnp.ones(x.shape, x.dtype)
        out.append(jnp.asarray(x))
    return tuple(out)


def measure_latency_model(
    model: nnx.Module,
    *inputs: Any,
    groups: Sequence[str] | None = None,
    grid: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    repeats: int = 25,
    warmup: int = 3,
    overhead: float | None = None,
    clock: str = "wall",
    compiler_options: Mapping[str, Any] | None = None,
) -> LatencyModel:
    """Time every contraction of ``model(*inputs)`` on the current device on a width grid.

    The forward pass is traced (:func:`jaxcompress.structure.macs`); every ``dot_general`` and
    convolution becomes a term whose operand shapes are polynomials in the kept counts of the
    groups they depend on. Each varied group of size ``n`` is measured at widths
    ``round(m n)`` for ``m`` in ``grid`` (and ``n``); a term with ``k`` varied groups is timed
    at every grid combination (``len(grid)^k`` runs) by :func:`jaxcompress.spdy.measure` (jit,
    warm-up, interleaved rounds, median, per-call overhead subtracted), on random operands of
    those shapes, at the batch of ``inputs``.

    Args:
      model: any ``flax.nnx.Module`` (timed in inference mode).
      *inputs: example inputs, at the batch size to time.
      groups: names of the prunable groups whose widths vary (default: all prunable groups;
        an op's dependence on other groups is held at full size).
      grid: width fractions in ``(0, 1]``.
      repeats, warmup: timed and untimed runs per entry.
      overhead: seconds outside the terms; ``None`` (default) measures the whole jitted
        forward pass and keeps what the dense terms do not account for.
      clock, compiler_options: as :func:`jaxcompress.spdy.measure` (``clock="cpu"`` with
        ``{"xla_cpu_multi_thread_eigen": False}`` is steadier on a shared CPU).

    Raises:
      TypeError, ValueError: as :func:`jaxcompress.structure.macs`; an unknown or not
        prunable group; a bad grid; a term with more than 4096 grid points.
    """
    from jaxcompress.spdy import measure

    mc = structure_macs(model, *inputs)
    if groups is None:
        names = list(mc.sizes)
    else:
        if isinstance(groups, str) or not isinstance(groups, Sequence):
            raise TypeError(f"groups must be a sequence of group names, got {groups!r}")
        names = list(groups)
        for g in names:
            if g not in mc.sizes:
                raise ValueError(
                    f"groups names {g!r}, which is not a prunable group of the model; prunable "
                    f"groups are {list(mc.sizes)}"
                )
    fractions = tuple(grid)
    if not fractions or any(
        isinstance(m, bool) or not isinstance(m, numbers.Real) or not 0 < m <= 1 for m in fractions
    ):
        raise ValueError(f"grid must be non-empty fractions in (0, 1], got {grid!r}")
    if overhead is not None and (
        isinstance(overhead, bool)
        or not isinstance(overhead, numbers.Real)
        or not math.isfinite(overhead)
        or overhead < 0
    ):
        raise ValueError(f"overhead must be None or a finite float >= 0, got {overhead!r}")
    sizes = dict(mc.sizes)
    widths = {g: _grid_widths(sizes[g], fractions) for g in names}
    builders, options, term_groups = {}, {}, {}
    for i, op in enumerate(mc.ops):
        name = f"{i}:{op.primitive.name}"
        varied = tuple(g for g in op.groups if g in widths)
        combos = list(itertools.product(*[widths[g] for g in varied]))
        if len(combos) > _MAX_POINTS:
            raise ValueError(
                f"op {name} depends on groups {varied}: {len(combos)} grid points (at most "
                f"{_MAX_POINTS}); pass fewer groups or a coarser grid"
            )
        combos.sort(key=lambda c: tuple(-v for v in c))
        options[name] = combos
        term_groups[name] = varied

        def builder(combo, op=op, varied=varied, seed=i):
            kept = dict(zip(varied, combo, strict=True))
            shapes = op.operand_shapes(kept, sizes)
            params = op.op_params(kept, sizes)
            prim = op.primitive

            def fn(*args):
                return prim.bind(*args, **params)

            return fn, _operands(shapes, op.dtypes, seed)

        builders[name] = builder
    if not builders:
        raise ValueError(f"{type(model).__name__} has no dot_general or convolution to time")
    kwargs: dict[str, Any] = {}
    if overhead is None:
        forward, state = _forward(model)
        kwargs["model"] = (forward, (state, *_concrete(inputs)))
    else:
        kwargs["overhead"] = float(overhead)

    def label(combo):
        return ",".join(str(v) for v in combo) or "dense"

    table = measure(
        builders,
        options,
        label_fn=label,
        repeats=repeats,
        warmup=warmup,
        clock=clock,
        compiler_options=compiler_options,
        **kwargs,
    )
    terms = []
    for name, varied in term_groups.items():
        axes = tuple(np.array(widths[g], np.float64) for g in varied)
        times = np.empty(tuple(a.shape[0] for a in axes))
        for combo, time in zip(options[name], table[name].times, strict=True):
            pos = tuple(int(np.searchsorted(axes[k], v)) for k, v in enumerate(combo))
            times[pos] = max(float(time), 0.0)
        terms.append((name, varied, axes, times))
    return LatencyModel(
        tuple(terms),
        {g: sizes[g] for g in names},
        max(0.0, float(table.base - table.prunable)),
    )


def measure_latency(
    model: nnx.Module,
    *inputs: Any,
    repeats: int = 50,
    warmup: int = 5,
    clock: str = "wall",
    compiler_options: Mapping[str, Any] | None = None,
) -> float:
    """Median time in seconds of the jitted inference-mode forward pass ``model(*inputs)`` on
    the current device (:func:`jaxcompress.spdy.time_callable`: compiled, ``warmup`` untimed
    runs, ``repeats`` timed runs each ending in ``block_until_ready``).

    Raises:
      TypeError: ``model`` is not an NNX module. ValueError: no inputs.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    if not inputs:
        raise ValueError("inputs must hold at least one example input of the model, got none")
    forward, state = _forward(model)
    median, _ = time_callable(
        forward,
        (state, *_concrete(inputs)),
        repeats=repeats,
        warmup=warmup,
        clock=clock,
        compiler_options=compiler_options,
    )
    return float(median)
