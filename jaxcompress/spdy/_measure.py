"""Measure a :class:`TimingTable` on the current device.

SPDY's published tables were measured with a CPU sparse runtime and post-processed by hand
(IST-DASLab/spdy#2), so new models need their own per-layer latencies. :func:`measure` times
each layer at each option with user-supplied builders: a builder maps an option (a sparsity,
``"2:4"``, a channel count, a rank, ...) to ``(fn, args)``, and the table entry is the median
wall time of ``jax.jit(fn)(*args)`` after warm-up. Nothing here depends on a model library;
build the callables from Flax, Equinox or plain ``jnp`` as you like.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxcompress.spdy._tables import LayerOptions, TimingTable

__all__ = ["measure", "time_callable"]

Builder = Callable[[Any], tuple[Callable[..., Any], tuple]]


def time_callable(
    fn: Callable[..., Any], args: tuple, *, repeats: int = 25, warmup: int = 3
) -> tuple[float, float]:
    """Median wall time of ``jax.jit(fn)(*args)`` and its relative noise.

    The function is compiled and run ``warmup`` times first; each timed run ends with
    ``jax.block_until_ready``. Noise is the interquartile range over the median.

    Returns:
      ``(median_seconds, iqr / median)``.
    """
    _check_count("repeats", repeats, 1)
    _check_count("warmup", warmup, 0)
    jitted = jax.jit(fn)
    jax.block_until_ready(jitted(*args))  # compile
    for _ in range(warmup):
        jax.block_until_ready(jitted(*args))
    samples = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        samples[i] = time.perf_counter() - t0
    med = float(np.median(samples))
    q1, q3 = np.percentile(samples, [25, 75])
    return med, float((q3 - q1) / med) if med > 0 else 0.0


def _check_count(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}")


def measure(
    layers: Mapping[str, Builder],
    options: Sequence[Any] | Mapping[str, Sequence[Any]],
    *,
    model: tuple[Callable[..., Any], tuple] | None = None,
    overhead: float | None = None,
    label_fn: Callable[[Any], str] | None = None,
    repeats: int = 25,
    warmup: int = 3,
) -> TimingTable:
    """Time every layer at every option and assemble a :class:`TimingTable`.

    Args:
      layers: layer name -> builder, in model order. ``builder(option)`` returns
        ``(fn, args)``; ``fn(*args)`` runs the layer compressed with that option on
        representative inputs (e.g. a Dense layer with a masked kernel, a 2:4 matmul, a
        narrower layer, a low-rank pair).
      options: options shared by all layers, or a mapping name -> options. Option 0 of every
        layer must be the uncompressed layer (its time feeds ``prunable``).
      model: optional ``(fn, args)`` of the whole dense model; its time is ``base``.
      overhead: alternatively, the time of everything outside the listed layers;
        ``base = prunable + overhead``. Give at most one of ``model`` and ``overhead``
        (neither: ``overhead = 0``).
      label_fn: option -> label; default ``f"{o:.4f}"`` for numbers, else ``str``.
      repeats, warmup: timed runs (median) and untimed runs after compilation.

    Returns:
      A table whose layers carry per-option ``noise`` (IQR / median).
    """
    if not isinstance(layers, Mapping) or not layers:
        raise ValueError("layers must be a non-empty mapping name -> builder")
    if model is not None and overhead is not None:
        raise ValueError("give at most one of model and overhead")
    if overhead is not None and (not math.isfinite(float(overhead)) or overhead < 0):
        raise ValueError(f"overhead must be finite and non-negative; got {overhead!r}")
    _check_count("repeats", repeats, 1)
    _check_count("warmup", warmup, 0)

    def default_label(o):
        return f"{o:.4f}" if isinstance(o, (float, int, np.floating, np.integer)) else str(o)

    label_fn = label_fn or default_label
    out = []
    for name, builder in layers.items():
        if not callable(builder):
            raise TypeError(f"layers[{name!r}] must be callable (option -> (fn, args))")
        opts = options[name] if isinstance(options, Mapping) else options
        if len(opts) == 0:
            raise ValueError(f"layer {name!r} has no options")
        times, noise = [], []
        for opt in opts:
            built = builder(opt)
            if not (isinstance(built, tuple) and len(built) == 2 and callable(built[0])):
                raise TypeError(
                    f"builder for layer {name!r} must return (fn, args); got {type(built)}"
                )
            fn, args = built
            t, n = time_callable(fn, tuple(args), repeats=repeats, warmup=warmup)
            times.append(t)
            noise.append(n)
        out.append(LayerOptions(name, tuple(label_fn(o) for o in opts), times, noise))
    prunable = float(sum(layer.times[0] for layer in out))
    if model is not None:
        base, _ = time_callable(model[0], tuple(model[1]), repeats=repeats, warmup=warmup)
        base = max(base, prunable)  # measured separately; keep base >= prunable
    else:
        base = prunable + float(overhead or 0.0)
    return TimingTable(base=base, prunable=prunable, layers=tuple(out))
