"""Phase schedules for AC/DC: which training steps are dense, compressed or decompressed.

AC/DC (Peste, Iofinova, Vladu, Alistarh, "AC/DC: Alternating Compressed/DeCompressed Training
of Deep Neural Networks", NeurIPS 2021, arXiv:2106.12379) trains in phases:

1. a dense warm-up of ``W`` steps, ``[0, W)``;
2. ``n`` cycles, each a compressed phase of ``C`` steps followed by a decompressed phase of
   ``D`` steps; cycle ``k`` starts at ``W + k (C + D)``;
3. a final compressed phase ``[F, T)`` from ``F`` to the end of training ``T``.

With period ``P = C + D`` the number of cycles is ``n = (F - W) // P`` (at least 1), and the
last decompressed phase runs until ``F``: it is longer than ``D`` by ``(F - W) mod P`` steps.
This is how the reference ImageNet configs look (5-epoch phases, then a 10-epoch last
decompressed phase before the final compressed phase at epoch 85; reference code
IST-DASLab/ACDC).

For a step ``t`` (a Python int or an int array, possibly traced) with ``r = t - W``,
``k = r // P`` and ``q = r mod P``::

    is_compressed(t)               = (W <= t < F and k < n and q < C) or t >= F
    is_compressed_phase_start(t)   = (W <= t < F and k < n and q == 0) or t == F
    is_decompressed_phase_start(t) =  W <= t < F and k < n and q == C

Steps at or after ``T`` stay in the final compressed phase. All three are a few integer
operations on the step, so a jitted train step evaluates them on a traced step counter
without recompiling when the phase changes.

The reference code expresses the same schedule with ``[start, freq, end]`` triples per pruner
("compress" events at the epochs of ``range(start, end, freq)``) and per recycler
("decompress" events), pruning winning when both fire at one epoch, and events at epoch
starts. :func:`acdc_schedule_from_epochs` turns such triples into an :class:`AcdcSchedule`
in steps and checks that it reproduces the reference events exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress._checks import check_int

__all__ = ["AcdcSchedule", "acdc_schedule", "acdc_schedule_from_epochs"]

#: Event kinds in :meth:`AcdcSchedule.events`.
COMPRESS = "compress"
DECOMPRESS = "decompress"


@dataclasses.dataclass(frozen=True)
class AcdcSchedule:
    """An AC/DC phase schedule in optimizer steps (static ints; hashable).

    Attributes:
      warmup_steps: ``W``, the length of the dense warm-up; the first compressed phase starts
        at step ``W`` (``W >= 0``).
      compressed_steps: ``C``, the length of each compressed phase before the final one.
      decompressed_steps: ``D``, the length of each decompressed phase (the last one is longer
        by ``(F - W) mod (C + D)`` steps, see the module docstring).
      final_compressed_start: ``F``, the first step of the final compressed phase.
      total_steps: ``T``, the number of training steps; the final phase is ``[F, T)``.

    Raises:
      TypeError: a field that is not an int.
      ValueError: a phase of length <= 0, a final phase that does not fit before ``T``, or
        fewer than one full compressed + decompressed cycle between ``W`` and ``F``.
    """

    warmup_steps: int
    compressed_steps: int
    decompressed_steps: int
    final_compressed_start: int
    total_steps: int

    def __post_init__(self):
        w = check_int("warmup_steps", self.warmup_steps, minimum=0)
        c = check_int("compressed_steps", self.compressed_steps, minimum=1)
        d = check_int("decompressed_steps", self.decompressed_steps, minimum=1)
        f = check_int("final_compressed_start", self.final_compressed_start, minimum=0)
        t = check_int("total_steps", self.total_steps, minimum=1)
        if f >= t:
            raise ValueError(
                f"final_compressed_start: the final compressed phase must start before "
                f"total_steps={t}, got {f} (a final phase of length {t - f} <= 0)"
            )
        if f - w < c + d:
            raise ValueError(
                f"final_compressed_start: expected at least one compressed + decompressed cycle "
                f"(compressed_steps + decompressed_steps = {c + d}) between the end of the "
                f"warm-up (warmup_steps={w}) and the final compressed phase, i.e. "
                f"final_compressed_start >= {w + c + d}, got {f}"
            )
        for name, value in (
            ("warmup_steps", w),
            ("compressed_steps", c),
            ("decompressed_steps", d),
            ("final_compressed_start", f),
            ("total_steps", t),
        ):
            object.__setattr__(self, name, value)
        if t >= 2**31 - 1:
            raise ValueError(f"total_steps: expected < 2^31 - 1 (int32 step counter), got {t}")

    # ------------------------------------------------------------------ derived

    @property
    def period(self) -> int:
        """``C + D``, the length of one compressed + decompressed cycle."""
        return self.compressed_steps + self.decompressed_steps

    @property
    def num_cycles(self) -> int:
        """``n = (F - W) // (C + D)``, the number of cycles before the final phase."""
        return (self.final_compressed_start - self.warmup_steps) // self.period

    def events(self) -> tuple[tuple[int, str], ...]:
        """The phase starts as ``(step, "compress" | "decompress")``, in step order."""
        out: list[tuple[int, str]] = []
        for k in range(self.num_cycles):
            start = self.warmup_steps + k * self.period
            out.append((start, COMPRESS))
            out.append((start + self.compressed_steps, DECOMPRESS))
        out.append((self.final_compressed_start, COMPRESS))
        return tuple(out)

    def phases(self) -> tuple[tuple[int, int, str], ...]:
        """The timeline as ``(start, end, "dense" | "compressed" | "decompressed")``, end excl."""
        out: list[tuple[int, int, str]] = []
        if self.warmup_steps > 0:
            out.append((0, self.warmup_steps, "dense"))
        events = self.events()
        for (start, kind), (end, _) in zip(events[:-1], events[1:], strict=True):
            out.append((start, end, "compressed" if kind == COMPRESS else "decompressed"))
        out.append((self.final_compressed_start, self.total_steps, "compressed"))
        return tuple(out)

    # ------------------------------------------------------------------ step predicates

    def _cycle_position(self, step: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
        t = jnp.asarray(step, jnp.int32)
        r = t - jnp.int32(self.warmup_steps)
        k = jnp.floor_divide(r, jnp.int32(self.period))
        q = r - k * jnp.int32(self.period)
        in_cycles = (
            (t >= self.warmup_steps) & (t < self.final_compressed_start) & (k < self.num_cycles)
        )
        return t, in_cycles, q

    def is_compressed(self, step: Any) -> jax.Array:
        """Whether step ``step`` trains the sparse model (bool scalar; jit-friendly)."""
        t, in_cycles, q = self._cycle_position(step)
        return (in_cycles & (q < self.compressed_steps)) | (t >= self.final_compressed_start)

    def is_compressed_phase_start(self, step: Any) -> jax.Array:
        """Whether step ``step`` is the first of a compressed phase (a new mask is in force)."""
        t, in_cycles, q = self._cycle_position(step)
        return (in_cycles & (q == 0)) | (t == self.final_compressed_start)

    def is_decompressed_phase_start(self, step: Any) -> jax.Array:
        """Whether step ``step`` is the first of a decompressed phase (inner state is reset)."""
        _, in_cycles, q = self._cycle_position(step)
        return in_cycles & (q == self.compressed_steps)

    def phase_at(self, step: int) -> str:
        """``"dense"``, ``"compressed"`` or ``"decompressed"`` at a concrete step (host side)."""
        step = check_int("step", step, minimum=0)
        if step < self.warmup_steps:
            return "dense"
        return "compressed" if bool(self.is_compressed(step)) else "decompressed"


def acdc_schedule(
    *,
    warmup_steps: int,
    compressed_steps: int,
    decompressed_steps: int,
    final_compressed_steps: int,
    total_steps: int,
) -> AcdcSchedule:
    """Builds an :class:`AcdcSchedule` from phase lengths in steps.

    The final compressed phase is the last ``final_compressed_steps`` steps:
    ``final_compressed_start = total_steps - final_compressed_steps``. Cycles of
    ``compressed_steps`` + ``decompressed_steps`` fill ``[warmup_steps, final_compressed_start)``;
    the last decompressed phase absorbs any remainder (module docstring).

    Example: the paper's CIFAR-100 recipe at 390 steps per epoch is
    ``acdc_schedule(warmup_steps=3900, compressed_steps=7800, decompressed_steps=7800,
    final_compressed_steps=11700, total_steps=78000)``.

    Raises:
      TypeError: a non-int argument.
      ValueError: ``final_compressed_steps`` <= 0 or > ``total_steps``, any other phase length
        <= 0, or no room for one full cycle between warm-up and the final phase.
    """
    total = check_int("total_steps", total_steps, minimum=1)
    final = check_int("final_compressed_steps", final_compressed_steps, minimum=1)
    if final > total:
        raise ValueError(
            f"final_compressed_steps: the final compressed phase must fit in total_steps={total}, "
            f"got {final}"
        )
    return AcdcSchedule(
        warmup_steps=warmup_steps,
        compressed_steps=compressed_steps,
        decompressed_steps=decompressed_steps,
        final_compressed_start=total - final,
        total_steps=total,
    )


def _as_triples(name: str, value: Any) -> list[tuple[int, int, int]]:
    """One ``[start, freq, end]`` triple or a sequence of them, as a list of int triples."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or not value:
        raise TypeError(
            f"{name}: expected a [start, freq, end] triple or a sequence of them, got {value!r}"
        )
    nested = all(isinstance(v, Sequence) and not isinstance(v, str | bytes) for v in value)
    triples = list(value) if nested else [value]
    out = []
    for i, triple in enumerate(triples):
        where = f"{name}[{i}]" if nested else name
        if len(triple) != 3:
            raise ValueError(f"{where}: expected a [start, freq, end] triple, got {triple!r}")
        start = check_int(f"{where}[0] (start)", triple[0], minimum=0)
        freq = check_int(f"{where}[1] (freq)", triple[1], minimum=1)
        end = check_int(f"{where}[2] (end)", triple[2], minimum=0)
        if end <= start:
            raise ValueError(
                f"{where}: end (exclusive) must be greater than start, got {triple!r}, which "
                "schedules no event"
            )
        out.append((start, freq, end))
    return out


def acdc_schedule_from_epochs(
    prune_triple: Sequence[int] | Sequence[Sequence[int]],
    recycle_triple: Sequence[int] | Sequence[Sequence[int]],
    *,
    steps_per_epoch: int,
    total_epochs: int,
) -> AcdcSchedule:
    """Builds an :class:`AcdcSchedule` from the reference code's epoch triples.

    In the reference (IST-DASLab/ACDC, ``policies/manager.py``) a pruner with
    ``epochs: [start, freq, end]`` fires at the start of every epoch in
    ``range(start, end, freq)`` (``end`` exclusive) and starts a compressed phase with a new
    mask; a recycler triple likewise starts decompressed phases; when both fire at one epoch
    the pruner wins. Several pruners/recyclers are given as a list of triples. Epoch ``e``
    starts at step ``e * steps_per_epoch``.

    Examples (configs of the reference code IST-DASLab/ACDC), 200 epochs: ``[10, 40, 171]``
    and ``[30, 40, 151]`` give dense 0-10, compressed 10-30, 50-70, 90-110, 130-150,
    decompressed 30-50, 70-90, 110-130, 150-170, final compressed 170-200. ImageNet, 100 epochs:
    ``[[10, 10, 71], [85, 20, 100]]`` and ``[[15, 10, 66], [75, 20, 86]]`` give 5-epoch phases
    from 10 to 75, a decompressed phase 75-85 and a final compressed phase 85-100.

    Args:
      prune_triple: ``[start, freq, end]`` or a sequence of such triples (compress events).
      recycle_triple: the same for decompress events.
      steps_per_epoch: optimizer steps per epoch (> 0).
      total_epochs: training length in epochs (> 0); every event must fall before it.

    Returns:
      The schedule in steps; its :meth:`AcdcSchedule.events` equal the reference events
      times ``steps_per_epoch``.

    Raises:
      TypeError / ValueError: malformed triples or counts; events at or after
        ``total_epochs``; events that do not alternate compress/decompress starting and ending
        with compress; or a timeline that is not a dense warm-up followed by equal-length
        cycles and a final compressed phase (the message lists the events).
    """
    spe = check_int("steps_per_epoch", steps_per_epoch, minimum=1)
    total = check_int("total_epochs", total_epochs, minimum=1)
    prunes: set[int] = set()
    for start, freq, end in _as_triples("prune_triple", prune_triple):
        prunes.update(range(start, end, freq))
    recycles: set[int] = set()
    for start, freq, end in _as_triples("recycle_triple", recycle_triple):
        recycles.update(range(start, end, freq))
    recycles -= prunes  # the reference prunes when both fire at one epoch
    events = sorted([(e, COMPRESS) for e in prunes] + [(e, DECOMPRESS) for e in recycles])
    late = [e for e, _ in events if e >= total]
    if late:
        raise ValueError(
            f"total_epochs: events at epochs {late} fall at or after total_epochs={total}; "
            "shorten the triples or raise total_epochs"
        )
    kinds = [k for _, k in events]
    alternating = all(k == (COMPRESS if i % 2 == 0 else DECOMPRESS) for i, k in enumerate(kinds))
    if not alternating or kinds[-1] != COMPRESS or len(kinds) < 3:
        raise ValueError(
            "prune_triple/recycle_triple: expected events alternating compress, decompress, ..., "
            f"starting and ending with compress (at least one cycle), got {events}"
        )
    w, r1, p2, final = events[0][0], events[1][0], events[2][0], events[-1][0]
    schedule = AcdcSchedule(
        warmup_steps=w * spe,
        compressed_steps=(r1 - w) * spe,
        decompressed_steps=(p2 - r1) * spe,
        final_compressed_start=final * spe,
        total_steps=total * spe,
    )
    expected = tuple((e * spe, k) for e, k in events)
    if schedule.events() != expected:
        got = [(s // spe, k) for s, k in schedule.events()]
        raise ValueError(
            "prune_triple/recycle_triple: the events are not a dense warm-up followed by "
            "equal compressed/decompressed cycles and a final compressed phase; reference "
            f"events (epochs) {events}, closest AcdcSchedule gives {got}"
        )
    return schedule
