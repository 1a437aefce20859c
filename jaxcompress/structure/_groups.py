"""Dependency groups: the leaf atom classes that model variables and activations share."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import nnx

from jaxcompress.structure._atoms import Atoms, Seq
from jaxcompress.structure._trace import Path, Trace, trace


@dataclasses.dataclass(frozen=True, eq=False)
class Slice:
    """One axis of one model variable that a group's units index.

    Attributes:
      path: the variable's NNX path, e.g. ``("layers", 0, "kernel")``.
      axis: the axis of the variable.
      units: int array of the axis' length: the group unit that each index belongs to, or -1
        for indices that belong to other groups (a concatenation, or a reshape of one axis into
        several groups such as ``(heads, head_dim)``). Removing unit ``u`` removes every index
        ``i`` with ``units[i] == u``.
      kind: the variable's type, e.g. ``nnx.Param`` or ``nnx.BatchStat``.
    """

    path: Path
    axis: int
    units: np.ndarray
    kind: type

    @property
    def name(self) -> str:
        return "/".join(str(p) for p in self.path)

    def __repr__(self) -> str:
        return f"Slice({self.name}, axis={self.axis})"


@dataclasses.dataclass(frozen=True, eq=False)
class Group:
    """Units that must be removed together: a channel of every layer that reads or writes it.

    Attributes:
      name: stable readable name, from the variable that produces the units (a Dense or Conv
        kernel's output axis, e.g. ``"layers/0"``, with ``":axis"`` or ``".k"`` appended when one
        module produces several groups, e.g. ``"blocks/0/attn/query:1"`` for heads).
      size: number of units.
      members: every variable axis the units index (kernels on both sides, biases, norm scales,
        biases and running statistics, tied weights), as :class:`Slice` objects.
      reasons: why the units cannot be removed (empty when prunable): the primitive that
        reduces or mixes them, ``"it is an axis of the model output"``, ... .
    """

    name: str
    size: int
    members: tuple[Slice, ...]
    reasons: tuple[str, ...]

    @property
    def prunable(self) -> bool:
        return not self.reasons

    def __repr__(self) -> str:
        state = "prunable" if self.prunable else f"not prunable: {'; '.join(self.reasons)}"
        params = ", ".join(f"{m.name}[{m.axis}]" for m in self.members)
        return f"Group({self.name!r}, size={self.size}, {state}, members=[{params}])"


@dataclasses.dataclass
class Analysis:
    """Groups plus the trace they came from (for pruning and MAC counts)."""

    groups: dict[str, Group]
    trace: Trace
    class_of: dict[str, int]  # group name -> leaf atom root
    consumed: dict[str, tuple[Slice, ...]]  # group name -> members contracted with activations

    def group_of_class(self) -> dict[int, str]:
        return {c: n for n, c in self.class_of.items()}


def _layout(atoms: Atoms, seq: Seq, conflicts: set[int]) -> dict[int, np.ndarray]:
    """For every leaf class under ``seq``: the unit of each index of the axis (-1 elsewhere)."""
    leaves = atoms.leaves(seq)
    total = int(np.prod([atoms.size[r] for r in leaves], dtype=np.int64)) if leaves else 1
    out: dict[int, np.ndarray] = {}
    stride = total
    pos = np.arange(total)

    def put(cls: int, arr: np.ndarray) -> None:
        if cls in out:
            both = (out[cls] >= 0) & (arr >= 0)
            if both.any():
                conflicts.add(cls)
            out[cls] = np.where(arr >= 0, arr, out[cls])
        else:
            out[cls] = arr

    for r in leaves:
        n = atoms.size[r]
        stride //= n
        digit = (pos // stride) % n
        if r in atoms.parts:
            offset = 0
            for part in atoms.parts[r]:
                psize = atoms.seq_size(part)
                inside = (digit >= offset) & (digit < offset + psize)
                local = np.clip(digit - offset, 0, psize - 1)
                for cls, arr in _layout(atoms, part, conflicts).items():
                    put(cls, np.where(inside, arr[local], -1))
                offset += psize
        else:
            put(r, digit)
    return out


def _module_name(path: Path) -> str:
    return "/".join(str(p) for p in (path[:-1] if len(path) > 1 else path))


def analyse(model: nnx.Module, inputs: Sequence[Any]) -> Analysis:
    """Trace ``model(*inputs)`` and collect its dependency groups."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    if not inputs:
        raise ValueError("inputs must hold at least one example input of the model, got none")
    tr = trace(model, tuple(inputs))
    atoms = tr.atoms
    conflicts: set[int] = set()
    members: dict[int, list[Slice]] = {}
    for path, (kind, _, axes) in tr.variables.items():
        for axis, seq in enumerate(axes):
            for cls, units in _layout(atoms, seq, conflicts).items():
                members.setdefault(cls, []).append(Slice(path, axis, units, kind))
    classes = [c for c in members if c in atoms.active and c not in atoms.parts]

    # Names: from the first variable that produces the class (dot_general / conv free axes).
    producer: dict[int, Path] = {}
    for seq, path in tr.producers:
        for cls in atoms.deep_leaves(seq):
            producer.setdefault(cls, path)
    order = {c: i for i, c in enumerate(producer)}
    classes.sort(key=lambda c: (order.get(c, len(order)), 0))
    base: dict[int, str] = {}
    for c in classes:
        if c in producer:
            base[c] = _module_name(producer[c])
        else:
            m = members[c][0]
            base[c] = f"{m.name}:{m.axis}"
    names: dict[int, str] = {}
    by_base: dict[str, list[int]] = {}
    for c in classes:
        by_base.setdefault(base[c], []).append(c)
    for b, cs in by_base.items():
        if len(cs) == 1:
            names[cs[0]] = b
            continue
        by_axis: dict[str, list[int]] = {}
        for c in cs:
            m = next((m for m in members[c] if c in producer and m.path == producer[c]), None)
            key = f"{b}:{m.axis}" if m is not None else b
            by_axis.setdefault(key, []).append(c)
        for key, cs2 in by_axis.items():
            for k, c in enumerate(cs2):
                names[c] = key if len(cs2) == 1 else f"{key}.{k}"
    consumers: dict[int, set[Path]] = {}
    for seq, path in tr.consumers:
        for cls in atoms.deep_leaves(seq):
            consumers.setdefault(cls, set()).add(path)
    groups: dict[str, Group] = {}
    class_of: dict[str, int] = {}
    consumed: dict[str, tuple[Slice, ...]] = {}
    for c in classes:
        name = names[c]
        while name in groups:
            name += "'"
        reasons = set(atoms.reasons.get(c, ()))
        if c in conflicts:
            reasons.add("it indexes one variable axis twice")
        groups[name] = Group(name, atoms.size[c], tuple(members[c]), tuple(sorted(reasons)))
        class_of[name] = c
        consumed[name] = tuple(m for m in members[c] if m.path in consumers.get(c, ()))
    return Analysis(groups, tr, class_of, consumed)
