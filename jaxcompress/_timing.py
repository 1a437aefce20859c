"""Timing of jitted callables on the current device: the library's one stopwatch.

:func:`time_callables` compiles every ``(fn, args)`` pair, warms it up and times
``jax.jit(fn)(*args)`` ``repeats`` times, interleaved (round-robin over the callables, so a
change of machine load affects all of them alike) or one callable after another, on the wall
clock or on this process's CPU clock (``CLOCKS``). Each timed run ends with
``jax.block_until_ready``; arguments are put on the device once, before any run. A result is a
:class:`Timing`: the median and the noise, the interquartile range over the median
(IQR / median). :func:`paired` summarises the differences of two callables timed in the same
rounds (drifting load cancels); :func:`null_call` is the trivial computation whose time is the
per-call overhead. :class:`Timer` holds validated settings and returns the raw samples.

Users: :func:`jaxcompress.spdy.measure` (timing tables) and
:meth:`jaxcompress.spdy.GroupOptions.measure` build on :class:`Timer`;
:mod:`jaxcompress.latency` times whole models with :func:`time_callable`. The public names are
exported by :mod:`jaxcompress.spdy`. This module imports nothing from jaxcompress's
subpackages.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress._checks import check_int

__all__ = [
    "CLOCKS",
    "Timer",
    "Timing",
    "null_call",
    "paired",
    "summary",
    "time_callable",
    "time_callables",
]


def null_call(*args: Any) -> jax.Array:
    """A trivial computation over the same arguments as a layer: one element of the first
    array leaf (a zero scalar if there is none). Its jitted time is the per-call overhead."""
    leaves = [x for x in jax.tree.leaves(args) if hasattr(x, "shape")]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.reshape(leaves[0], (-1,))[:1]


def summary(samples: np.ndarray) -> tuple[float, float]:
    """``(median, IQR / median)`` of ``samples`` (noise 0 when the median is not positive)."""
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
        med, noise = summary(s)
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
        check_int("repeats", repeats, minimum=1)
        check_int("warmup", warmup, minimum=0)
        return cls(
            repeats, warmup, _check_clock(clock), _check_options(compiler_options), interleave
        )

    def run(self, calls, *, sampler: Callable[..., Any] | None = None) -> tuple[np.ndarray, ...]:
        """``(samples on the clock, wall, cpu)``, each ``float64[len(calls), repeats]``.

        ``sampler`` replaces the function that takes the raw ``(wall, cpu)`` samples (keyword
        arguments as :func:`_samples`); :func:`jaxcompress.spdy.measure` passes its module's
        ``_samples``, so a test can swap the clock there.
        """
        wall, cpu = (sampler or _samples)(
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
