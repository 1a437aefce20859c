"""Measure a :class:`TimingTable` on the current device (the timing itself is
:mod:`jaxcompress._timing`).

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

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxcompress import _timing
from jaxcompress._timing import Timer, _samples, null_call, paired
from jaxcompress.spdy._tables import LayerOptions, TimingTable

__all__ = ["measure"]

Builder = Callable[[Any], tuple[Callable[..., Any], tuple]]


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
      interleave: time all callables round-robin (see :func:`jaxcompress.spdy.time_callables`).
      subtract_call_overhead: subtract each layer's null-call time from its own timings.
      clock, compiler_options: as :func:`jaxcompress.spdy.time_callables` (``clock="cpu"`` with a
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
    samples, _, _ = timer.run(calls, sampler=_samples)
    model_time = float(np.median(samples[model_at])) if model_at else 0.0

    out = []
    delta: dict[int, tuple[float, float]] = {}
    for name, labels, idx, null, ctx in plan:
        c = float(np.median(samples[null])) if null is not None else 0.0
        stats = [_timing.summary(samples[i]) for i in idx]
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
