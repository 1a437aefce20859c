"""Union-find over *atoms*: the factors that array axes are made of.

Every axis of every traced value is a sequence of atoms (major to minor), whose sizes multiply
to the axis size (size-1 factors are dropped). Two axes that carry the same channel identity are
*unified*: their atom sequences are aligned left to right, an atom larger than its partner is
split into ``(partner size, rest)`` (a reshape of 128 channels into ``(4 heads, 32)`` splits the
128-atom of every axis it is unified with), and atoms of equal size are merged. An atom can also
be a *sum* of parts (a concatenation or a slice: each part is itself an atom sequence).

An atom class (a union-find root) that is neither split nor a sum is a *leaf*: a candidate
dependency group whose units are its indices. A class collects *reasons* that forbid removing
its units (reduced, model output, unsupported primitive, ...) and an *active* flag (some
activation carries it, as opposed to a parameter-only axis such as a conv kernel's spatial one).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence

Seq = tuple[int, ...]


class Atoms:
    """The atom store; see the module docstring."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.split: dict[int, tuple[int, int]] = {}
        self.parts: dict[int, tuple[Seq, ...]] = {}
        self.reasons: dict[int, set[str]] = {}
        self.active: set[int] = set()

    # ---------------------------------------------------------------- basic operations

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        return len(self.parent) - 1

    def seq(self, size: int) -> Seq:
        """A fresh axis of ``size`` (empty when ``size == 1``)."""
        return () if size == 1 else (self.new(size),)

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def leaves(self, seq: Iterable[int]) -> list[int]:
        """Roots of the product factors of ``seq``, splits expanded (sums are leaves here)."""
        out: list[int] = []
        stack = list(reversed(list(seq)))
        while stack:
            r = self.find(stack.pop())
            if self.size[r] == 1:
                continue
            if r in self.split:
                stack.extend(reversed(self.split[r]))
            else:
                out.append(r)
        return out

    def deep_leaves(self, seq: Iterable[int]) -> list[int]:
        """Like :meth:`leaves`, with sums replaced by the leaves of their parts."""
        out: list[int] = []
        for r in self.leaves(seq):
            if r in self.parts:
                for part in self.parts[r]:
                    out.extend(self.deep_leaves(part))
            else:
                out.append(r)
        return out

    def seq_size(self, seq: Iterable[int]) -> int:
        return math.prod(self.size[self.find(a)] for a in seq)

    def make_sum(self, parts: Sequence[Seq]) -> int:
        """A new atom that is the concatenation of ``parts`` (atom sequences)."""
        parts = tuple(tuple(p) for p in parts)
        atom = self.new(sum(self.seq_size(p) for p in parts))
        self.parts[atom] = parts
        return atom

    def _split(self, a: int, first: int) -> tuple[int, int]:
        c1, c2 = self.new(first), self.new(self.size[a] // first)
        self.split[a] = (c1, c2)
        for c in (c1, c2):
            self.reasons[c] = set(self.reasons.get(a, ()))
            if a in self.active:
                self.active.add(c)
        return c1, c2

    def _union(self, a: int, b: int, why: str) -> None:
        """Merge two leaf roots of equal size."""
        pa, pb = self.parts.get(a), self.parts.get(b)
        self.parent[b] = a
        ra = self.reasons.setdefault(a, set())
        ra |= self.reasons.pop(b, set())
        if b in self.active:
            self.active.add(a)
        if pb is not None:
            del self.parts[b]
            if pa is None:
                self.parts[a] = pb
            else:
                self._union_sums(a, pa, pb, why)

    def _flat_parts(self, parts: Sequence[Seq]) -> list[Seq]:
        """Parts with nested sums inlined."""
        out: list[Seq] = []
        for p in parts:
            ls = self.leaves(p)
            if len(ls) == 1 and ls[0] in self.parts:
                out.extend(self._flat_parts(self.parts[ls[0]]))
            else:
                out.append(tuple(p))
        return out

    def _union_sums(self, a: int, pa: Sequence[Seq], pb: Sequence[Seq], why: str) -> None:
        """Merge two sums of equal size: cut parts at the union of both sides' boundaries."""
        sides = [self._flat_parts(pa), self._flat_parts(pb)]
        bounds: set[int] = set()
        for parts in sides:
            off = 0
            for p in parts:
                off += self.seq_size(p)
                bounds.add(off)
        refined = []
        for parts in sides:
            out: list[Seq] = []
            off = 0
            for p in parts:
                n = self.seq_size(p)
                cuts = sorted(c - off for c in bounds if off < c < off + n)
                ls = self.leaves(p)
                if cuts and len(ls) != 1:
                    self.block((a,), f"{why} cuts a reshaped axis at a concatenation boundary")
                    return
                if cuts:
                    edges = [0, *cuts, n]
                    subs = tuple(
                        (self.new(hi - lo),) for lo, hi in zip(edges, edges[1:], strict=False)
                    )
                    self.parts[ls[0]] = subs
                    out.extend(subs)
                else:
                    out.append(p)
                off += n
            refined.append(out)
        self.parts[a] = tuple(refined[0])
        for p, q in zip(*refined, strict=True):
            self.unify(p, q, why)

    # ---------------------------------------------------------------- relations

    def unify(self, x: Iterable[int], y: Iterable[int], why: str) -> None:
        """Declare that two axes (atom sequences of equal total size) carry the same indices."""
        xs, ys = deque(self.leaves(x)), deque(self.leaves(y))
        while xs and ys:
            a, b = self.find(xs.popleft()), self.find(ys.popleft())
            if a == b:
                continue
            sa, sb = self.size[a], self.size[b]
            if sa == sb:
                self._union(a, b, why)
            elif sa > sb and sa % sb == 0 and a not in self.parts:
                xs.extendleft(reversed(self._split(a, sb)))
                ys.appendleft(b)
            elif sb > sa and sb % sa == 0 and b not in self.parts:
                ys.extendleft(reversed(self._split(b, sa)))
                xs.appendleft(a)
            else:
                self.block([a, b, *xs, *ys], f"{why} mixes it with another axis")
                return
        if xs or ys:
            self.block([*xs, *ys], f"{why} mixes it with another axis")

    def block(self, seq: Iterable[int], reason: str) -> None:
        """Record that the units of every leaf under ``seq`` cannot be removed, and why."""
        stack = list(seq)
        seen: set[int] = set()
        while stack:
            r = self.find(stack.pop())
            if r in seen:
                continue
            seen.add(r)
            self.reasons.setdefault(r, set()).add(reason)
            stack.extend(self.split.get(r, ()))
            for part in self.parts.get(r, ()):
                stack.extend(part)

    def mark_active(self, seq: Iterable[int]) -> None:
        for r in self.leaves(seq):
            self.active.add(r)

    def settle(self) -> None:
        """Push reasons and activity down from split and sum atoms to their leaves."""
        changed = True
        while changed:
            changed = False
            for r in range(len(self.parent)):
                if self.parent[r] != r:
                    continue
                children = list(self.split.get(r, ()))
                for part in self.parts.get(r, ()):
                    children.extend(part)
                if not children:
                    continue
                mine = self.reasons.get(r, set())
                for c in children:
                    c = self.find(c)
                    theirs = self.reasons.setdefault(c, set())
                    if not mine <= theirs:
                        theirs |= mine
                        changed = True
                    if r in self.active and c not in self.active:
                        self.active.add(c)
                        changed = True
