"""Measure a :class:`TimingTable` on the current device.

SPDY's published tables were measured with a CPU sparse runtime and post-processed by hand
(IST-DASLab/spdy#2), so new models need their own per-layer latencies. :func:`measure` times
each layer at each option with user-supplied builders: a builder maps an option (a sparsity,
``"2:4"``, a channel count, a rank, ...) to ``(fn, args)``, and the table entry is the median
time (wall clock, or this process's CPU time) of ``jax.jit(fn)(*args)`` after warm-up.
Nothing here depends on a model library; build the callables from Flax, Equinox or plain
``jnp`` as you like.

**The additive model and how the measurement serves it.** SPDY predicts the time of a
compressed model as

    T(j_1, ..., j_L) = F + sum_l t_l(j_l),        F = T_model - sum_l t_l(0),

i.e. the whole dense model's time ``T_model`` (``base``) with every layer's dense time
replaced by the chosen option's. Four things make separately timed layers disagree with the
whole jitted model, and :func:`measure` handles each:

* **per-call overhead.** Timing a layer on its own pays one dispatch + synchronisation
  (``c``, a few microseconds on CPU, more on an accelerator), the whole model pays it once. With
  ``subtract_call_overhead=True`` every layer's entries are reduced by ``c_l``, the median time
  of a trivial jitted call taking the same arguments, so the one ``c`` of the whole model stays
  in ``F`` where it belongs (entries are clipped at 0);
* **load drift.** On a shared machine the load changes over the seconds a table takes; timing
  all callables one after another lets early entries see a different machine than late ones.
  With ``interleave=True`` every callable is compiled and warmed up first, then each of the
  ``repeats`` rounds times every callable once (layers, options, the null calls and the whole
  model), so drift spreads over all entries alike. On a CPU shared with other jobs the wall
  time of a run is stretched by whatever share of the cores the others take (by 2x and more
  on a 2-core machine with a load of 8, unevenly across ops); ``clock="cpu"`` times the
  process's CPU seconds instead, with a single-threaded executable
  (``compiler_options={"xla_cpu_multi_thread_eigen": False}``) the work itself;
* **what a layer is.** ``t_l`` can only be additive if option ``j_l`` changes nothing outside
  layer ``l``. Dropping output channels of a conv also shrinks the next conv's input, so a
  "layer" for channel options must be the unit a channel group lives in (producer conv, its
  normalisation and activation, and the consumer conv that reads it); that is the caller's
  choice of builders (``experiments/spdy`` does it for a BN CNN);
* **context.** Inside the whole executable a layer reads inputs its predecessor just wrote,
  shares buffers and fusions across its boundaries, and may save more or less when narrowed
  than on its own. With ``context=`` every compressed option is timed as the change of the
  whole model's time with only that layer compressed (see :func:`measure`).

Noise of every entry is the interquartile range over the median (IQR / median).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.spdy._tables import LayerOptions, TimingTable

__all__ = ["CLOCKS", "Timing", "measure", "null_call", "time_callable", "time_callables"]

Builder = Callable[[Any], tuple[Callable[..., Any], tuple]]


def _check_count(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}")


def null_call(*args: Any) -> jax.Array:
    """A trivial computation over the same arguments as a layer: one element of the first
    array leaf (a zero scalar if there is none). Its jitted time is the per-call overhead."""
    leaves = [x for x in jax.tree.leaves(args) if hasattr(x, "shape")]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.reshape(leaves[0], (-1,))[:1]


def _summary(samples: np.ndarray) -> tuple[float, float]:
    med = float(np.median(samples))
    q1, q3 = np.percentile(samples, [25, 75])
    return med, float((q3 - q1) / med) if med > 0 else 0.0


def paired(samples: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """``(median, IQR / median(samples))`` of the paired differences ``samples - reference``
    (a model timed right after its reference in every round: drifting load cancels)."""
    diff = samples - reference
    q1, q3 = np.percentile(diff, [25, 75])
    return float(np.median(diff)), float((q3 - q1) / np.median(samples))


CLOCKS = ("wall", "cpu")


class Timing(NamedTuple):
    """Timing of one callable: ``median`` and ``noise`` (IQR / median) on the requested clock,
    and the medians on both clocks (seconds)."""

    median: float
    noise: float
    wall: float
    cpu: float


def _check_clock(clock: Any) -> str:
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}; got {clock!r}")
    return clock


def _check_options(compiler_options: Any) -> dict | None:
    if compiler_options is None:
        return None
    if not isinstance(compiler_options, Mapping):
        raise TypeError(
            f"compiler_options must be a mapping or None; got {type(compiler_options).__name__}"
        )
    return dict(compiler_options)


def time_callables(
    calls: Sequence[tuple[Callable[..., Any], tuple]],
    *,
    repeats: int = 25,
    warmup: int = 3,
    interleave: bool = True,
    clock: str = "wall",
    compiler_options: Mapping[str, Any] | None = None,
) -> list[Timing]:
    """Median time and relative noise of ``jax.jit(fn)(*args)`` for each ``(fn, args)``.

    Every callable is compiled and run ``warmup`` times first. Then, with ``interleave=True``,
    ``repeats`` rounds each time every callable once in the given order (a change of machine
    load during the measurement affects all of them alike); with ``interleave=False`` each
    callable is timed ``repeats`` times in a row. Each timed run ends with
    ``jax.block_until_ready``. NumPy arguments are put on the device once, before any run, so
    no timed run includes a host-to-device copy.

    Args:
      calls: ``(fn, args)`` pairs.
      repeats, warmup: timed runs (median) and untimed runs after compilation.
      interleave: round-robin order (above).
      clock: ``"wall"`` (``time.perf_counter``: what a user waits) or ``"cpu"``
        (``time.process_time``: CPU seconds of this process, all threads). On a shared CPU
        machine other processes stretch wall time by whatever share of the cores they take,
        unevenly across runs; the process's CPU time counts the work itself. Use ``"cpu"``
        only on a CPU backend (an accelerator's work is not CPU time), preferably with a
        single-threaded executable (``compiler_options={"xla_cpu_multi_thread_eigen":
        False}``), so that no thread spins waiting for another.
      compiler_options: passed to ``jax.jit`` (XLA debug options of the executable).

    Returns:
      One :class:`Timing` per call, in order; both clocks are always recorded.
    """
    timer = Timer.of(repeats, warmup, clock, compiler_options, interleave=interleave)
    samples, wall, cpu = timer.run(calls)
    out = []
    for s, w, c in zip(samples, wall, cpu, strict=True):
        med, noise = _summary(s)
        out.append(Timing(med, noise, float(np.median(w)), float(np.median(c))))
    return out


def _on_device(args: tuple) -> tuple:
    """``args`` put on the default device, once. Passed as NumPy arrays or Python scalars,
    every timed call would copy them host-to-device first: on an H100 that cost more than the
    whole jitted model it fed. ``jax.device_put`` keeps Python scalars weakly typed, so the
    traced computation is the same."""
    return jax.device_put(args)


def _samples(
    calls: Sequence[tuple[Callable[..., Any], tuple]],
    *,
    repeats: int,
    warmup: int,
    interleave: bool,
    compiler_options: dict | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Raw ``(wall, cpu)`` seconds, each ``float64[len(calls), repeats]`` (see
    :func:`time_callables`). One ``jax.jit`` wrapper per distinct function object."""
    wrappers: dict[int, Any] = {}
    jitted = []
    for i, call in enumerate(calls):
        if not (isinstance(call, tuple) and len(call) == 2 and callable(call[0])):
            raise TypeError(f"calls[{i}] must be (fn, args); got {type(call).__name__}")
        fn, args = call[0], _on_device(tuple(call[1]))
        if id(fn) not in wrappers:
            wrappers[id(fn)] = (
                jax.jit(fn, compiler_options=compiler_options) if compiler_options else jax.jit(fn)
            )
        j = wrappers[id(fn)]
        jax.block_until_ready(j(*args))  # compile
        for _ in range(warmup):
            jax.block_until_ready(j(*args))
        jitted.append((j, args))
    wall = np.empty((len(jitted), repeats))
    cpu = np.empty((len(jitted), repeats))
    order = (
        [(i, r) for r in range(repeats) for i in range(len(jitted))]
        if interleave
        else [(i, r) for i in range(len(jitted)) for r in range(repeats)]
    )
    for i, r in order:
        j, args = jitted[i]
        c0, t0 = time.process_time(), time.perf_counter()
        jax.block_until_ready(j(*args))
        wall[i, r] = time.perf_counter() - t0
        cpu[i, r] = time.process_time() - c0
    return wall, cpu


@dataclasses.dataclass(frozen=True)
class Timer:
    """Validated timing settings (:func:`time_callables`); :meth:`run` times calls with them."""

    repeats: int
    warmup: int
    clock: str
    compiler_options: dict | None
    interleave: bool

    @classmethod
    def of(cls, repeats, warmup, clock, compiler_options, *, interleave=True) -> Timer:
        _check_count("repeats", repeats, 1)
        _check_count("warmup", warmup, 0)
        return cls(
            repeats, warmup, _check_clock(clock), _check_options(compiler_options), interleave
        )

    def run(self, calls) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(samples on the clock, wall, cpu)``, each ``float64[len(calls), repeats]``."""
        wall, cpu = _samples(
            calls,
            repeats=self.repeats,
            warmup=self.warmup,
            interleave=self.interleave,
            compiler_options=self.compiler_options,
        )
        return (wall if self.clock == "wall" else cpu), wall, cpu


def time_callable(
    fn: Callable[..., Any],
    args: tuple,
    *,
    repeats: int = 25,
    warmup: int = 3,
    clock: str = "wall",
    compiler_options: Mapping[str, Any] | None = None,
) -> tuple[float, float]:
    """Median time of ``jax.jit(fn)(*args)`` and its relative noise.

    The function is compiled and run ``warmup`` times first; each timed run ends with
    ``jax.block_until_ready``. Noise is the interquartile range over the median. ``clock`` and
    ``compiler_options`` as :func:`time_callables`.

    Returns:
      ``(median_seconds, iqr / median)``.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable; got {fn!r}")
    t = time_callables(
        [(fn, tuple(args))],
        repeats=repeats,
        warmup=warmup,
        clock=clock,
        compiler_options=compiler_options,
    )[0]
    return t.median, t.noise


def _check_built(built: Any, what: str) -> tuple[Callable[..., Any], tuple]:
    if not (isinstance(built, tuple) and len(built) == 2 and callable(built[0])):
        raise TypeError(f"{what} must return (fn, args); got {type(built).__name__}")
    return built[0], tuple(built[1])


def measure(
    layers: Mapping[str, Builder],
    options: Sequence[Any] | Mapping[str, Sequence[Any]],
    *,
    model: tuple[Callable[..., Any], tuple] | None = None,
    context: Callable[[str, Any], tuple[Callable[..., Any], tuple]] | None = None,
    overhead: float | None = None,
    label_fn: Callable[[Any], str] | None = None,
    repeats: int = 25,
    warmup: int = 3,
    interleave: bool = True,
    subtract_call_overhead: bool = True,
    clock: str = "wall",
    compiler_options: Mapping[str, Any] | None = None,
) -> TimingTable:
    """Time every layer at every option and assemble a :class:`TimingTable`.

    Entry ``t_l(j)`` is the median time of layer ``l`` at option ``j`` minus (by default) the
    per-call overhead ``c_l`` of a trivial jitted call with the same arguments
    (:func:`null_call`); ``base`` is the whole model's median time, so the fixed part
    ``base - prunable`` holds the non-compressible layers and the model's one call overhead
    (module docstring).

    **In context.** A layer timed on its own runs from warm caches, in its own executable.
    Inside the whole jitted model its inputs come from the previous layer, buffers and fusions
    cross its boundaries, and a narrower layer can save more or less than on its own. With
    ``context``, the
    layers are timed dense on their own (``t_l(0)``, the layer's share of ``base``) and every
    other entry is the change of the *whole model's* time:

        t_l(j) = t_l(0) + median_r [T_r(model with layer l at option j) - T_r(model)],  j >= 1,

    (clipped at 0), so each entry is what that option saves in the model; the table's
    prediction for a profile changing one layer is then the measured model. The dense model is
    timed right before every context model in each round ``r`` and the median is taken over
    these paired differences, so load that drifts over seconds cancels; ``base`` pools all
    those dense runs. Costs two whole-model timings per (layer, option); a ``context`` that
    returns the very same ``(fn, args)`` object again (e.g. two options giving the same
    channel count) is timed once. Context entries are exact for profiles that change one
    layer, but need not add up: on XLA:CPU (channel units of a BN CNN, batch 512) single-unit
    savings in context overlapped (cache effects), so profiles changing every unit ran 10-17%
    slower than predicted, while the same units timed on their own predicted them within 12%,
    conservatively. Check a table against end-to-end timings of a few profiles.

    Args:
      layers: layer name -> builder, in model order. ``builder(option)`` returns
        ``(fn, args)``; ``fn(*args)`` runs the layer compressed with that option on
        representative inputs (e.g. a Dense layer with a masked kernel, a 2:4 matmul, a
        narrower layer, a low-rank pair). An option must change nothing outside its layer for
        the table to be additive. With ``context`` only option 0 is built.
      options: options shared by all layers, or a mapping name -> options. Option 0 of every
        layer must be the uncompressed layer (its time feeds ``prunable``).
      model: optional ``(fn, args)`` of the whole dense model; its time is ``base``.
      context: optional ``(name, option) -> (fn, args)``: the whole model with layer ``name``
        at ``option`` and every other layer dense (needs ``model``); see above.
      overhead: alternatively to ``model``, the time of everything outside the listed layers;
        ``base = prunable + overhead``. Give at most one of ``model`` and ``overhead``
        (neither: ``overhead = 0``).
      label_fn: option -> label; default ``f"{o:.4f}"`` for numbers, else ``str``.
      repeats, warmup: timed runs (median) and untimed runs after compilation.
      interleave: time all callables round-robin (see :func:`time_callables`).
      subtract_call_overhead: subtract each layer's null-call time from its own timings.
      clock, compiler_options: as :func:`time_callables` (``clock="cpu"`` with a
        single-threaded executable for a CPU shared with other jobs).

    Returns:
      A table whose layers carry per-option ``noise``: IQR / median of the layer's timings,
      or with ``context`` for ``j >= 1`` the IQR of the paired differences over the median of
      the context model. If noise makes the summed dense layers exceed the measured model,
      ``base`` is raised to ``prunable``.
    """
    if not isinstance(layers, Mapping) or not layers:
        raise ValueError("layers must be a non-empty mapping name -> builder")
    if model is not None and overhead is not None:
        raise ValueError("give at most one of model and overhead")
    if overhead is not None and (not math.isfinite(float(overhead)) or overhead < 0):
        raise ValueError(f"overhead must be finite and non-negative; got {overhead!r}")
    if model is not None:
        model = _check_built(model, "model")
    if context is not None:
        if not callable(context):
            raise TypeError(
                f"context must be callable (name, option) -> (fn, args); got {context!r}"
            )
        if model is None:
            raise ValueError("context needs model (the dense model whose time is base)")
    timer = Timer.of(repeats, warmup, clock, compiler_options, interleave=interleave)

    def default_label(o):
        return f"{o:.4f}" if isinstance(o, (float, int, np.floating, np.integer)) else str(o)

    label_fn = label_fn or default_label
    calls: list[tuple[Callable[..., Any], tuple]] = []
    known: dict[int, int] = {}
    seen_context: dict[int, int] = {}
    keep_alive = []

    def add(built, what: str) -> int:
        # a builder returning the very same (fn, args) object twice is timed once
        if id(built) in known:
            return known[id(built)]
        keep_alive.append(built)
        calls.append(_check_built(built, what))
        known[id(built)] = len(calls) - 1
        return len(calls) - 1

    model_at = [] if model is None else [add(model, "model")]
    dense_model = model if model is not None else (null_call, ())  # context implies model
    plan = []
    for name, builder in layers.items():
        if not callable(builder):
            raise TypeError(f"layers[{name!r}] must be callable (option -> (fn, args))")
        opts = options[name] if isinstance(options, Mapping) else options
        if len(opts) == 0:
            raise ValueError(f"layer {name!r} has no options")
        own = opts[:1] if context is not None else opts
        idx = [add(builder(o), f"builder for layer {name!r}") for o in own]
        null = None
        if subtract_call_overhead:
            calls.append((null_call, calls[idx[0]][1]))
            null = len(calls) - 1
        ctx = []
        narrowed = [] if context is None else [context(name, o) for o in opts[1:]]
        for built in narrowed:
            if id(built) in seen_context:  # the same narrowed model: one timing, one delta
                ctx.append((None, seen_context[id(built)]))
                continue
            # the dense model right before each context model: paired differences
            calls.append(dense_model)
            model_at.append(len(calls) - 1)
            keep_alive.append(built)
            calls.append(_check_built(built, f"context for layer {name!r}"))
            seen_context[id(built)] = len(calls) - 1
            ctx.append((len(calls) - 2, len(calls) - 1))
        plan.append((name, tuple(label_fn(o) for o in opts), idx, null, ctx))
    samples, _, _ = timer.run(calls)
    model_time = float(np.median(samples[model_at])) if model_at else 0.0

    out = []
    delta: dict[int, tuple[float, float]] = {}
    for name, labels, idx, null, ctx in plan:
        c = float(np.median(samples[null])) if null is not None else 0.0
        stats = [_summary(samples[i]) for i in idx]
        times = [max(t - c, 0.0) for t, _ in stats]
        noise = [n for _, n in stats]
        for ref, i in ctx:
            if ref is not None:
                delta[i] = paired(samples[i], samples[ref])
            d, n = delta[i]
            times.append(max(times[0] + d, 0.0))
            noise.append(n)
        out.append(LayerOptions(name, labels, np.asarray(times), np.asarray(noise)))
    prunable = float(sum(layer.times[0] for layer in out))
    if model is not None:
        base = max(model_time, prunable)
    else:
        base = prunable + float(overhead or 0.0)
    return TimingTable(base=base, prunable=prunable, layers=tuple(out))
