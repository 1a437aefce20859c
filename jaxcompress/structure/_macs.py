"""Multiply-adds of a traced model as a polynomial in the kept units of its groups."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxcompress.structure._atoms import Atoms
from jaxcompress.structure._groups import Analysis

Poly = dict[tuple[str, ...], int]


def _mul(a: Poly, b: Poly) -> Poly:
    out: Poly = {}
    for ka, ca in a.items():
        for kb, cb in b.items():
            key = tuple(sorted(ka + kb))
            out[key] = out.get(key, 0) + ca * cb
    return out


def _add(a: Poly, b: Poly) -> Poly:
    out = dict(a)
    for k, c in b.items():
        out[k] = out.get(k, 0) + c
    return out


def _seq_poly(atoms: Atoms, seq, names: dict[int, str]) -> Poly:
    poly: Poly = {(): 1}
    for r in atoms.leaves(seq):
        if r in atoms.parts:
            leaf: Poly = {}
            for part in atoms.parts[r]:
                leaf = _add(leaf, _seq_poly(atoms, part, names))
        elif r in names:
            leaf = {(names[r],): 1}
        else:
            leaf = {(): atoms.size[r]}
        poly = _mul(poly, leaf)
    return poly


def _eval(poly: Poly, kept: Mapping[str, Any], sizes: Mapping[str, int]) -> Any:
    total: Any = 0
    for key, coef in poly.items():
        term: Any = coef
        for name in key:
            term = term * kept.get(name, sizes[name])
        total = total + term
    return total


@dataclasses.dataclass(frozen=True, eq=False)
class Op:
    """One ``dot_general`` or convolution of the traced forward pass, as a function of the kept
    unit counts: enough to re-run it at any widths (e.g. to time it).

    Attributes:
      primitive: the JAX primitive; ``primitive.bind(*operands, **params)`` runs it.
      params: its parameters (``feature_group_count`` at full width for convolutions).
      shapes: per operand, per axis, the size as a polynomial in the kept counts.
      dtypes: the operand dtypes.
      feature_groups: for grouped convolutions, ``feature_group_count`` as a polynomial.
      macs: the op's multiply-adds as a polynomial (its share of :class:`MacCount`).
      groups: the prunable groups the op's shapes depend on.
      variables: per operand, the path of the model variable it reads (the operand is that
        variable through layout ops such as a transpose, reshape or dtype conversion), or
        ``None`` for an activation or an operand computed from several variables.
    """

    primitive: Any
    params: dict[str, Any]
    shapes: tuple[tuple[Poly, ...], ...]
    dtypes: tuple[Any, ...]
    feature_groups: Poly | None
    macs: Poly
    groups: tuple[str, ...]
    variables: tuple[Any, ...] = ()

    def operand_shapes(
        self, kept: Mapping[str, int], sizes: Mapping[str, int]
    ) -> tuple[tuple[int, ...], ...]:
        """The operand shapes at ``kept`` (groups not named at full ``sizes``)."""
        return tuple(tuple(int(_eval(p, kept, sizes)) for p in shape) for shape in self.shapes)

    def op_params(self, kept: Mapping[str, int], sizes: Mapping[str, int]) -> dict[str, Any]:
        """``params`` with ``feature_group_count`` at ``kept``."""
        if self.feature_groups is None:
            return dict(self.params)
        return {**self.params, "feature_group_count": int(_eval(self.feature_groups, kept, sizes))}


@dataclasses.dataclass(frozen=True)
class MacCount:
    """Multiply-adds of ``model(*inputs)`` as a function of each prunable group's kept units.

    ``macs(kept)`` is ``sum_t c_t prod_{g in t} kept[g]`` over the terms of every
    ``dot_general`` and convolution of the traced forward pass (``prod(out.shape) *
    prod(contracted sizes)``; convolutions times the kernel's spatial size), where a group
    not named in ``kept`` counts at full size. ``kept`` values may be ints or traced JAX scalars
    (e.g. relaxed counts inside a jitted loss), so the polynomial is differentiable in them.

    Attributes:
      terms: ``{(group names, with multiplicity): coefficient}``.
      sizes: full unit count of every prunable group.
      ops: the contractions the terms come from, one :class:`Op` each (to re-run or time them
        at other widths, e.g. ``jaxcompress.latency.measure_latency_model``).
    """

    terms: dict[tuple[str, ...], int]
    sizes: dict[str, int]
    ops: tuple[Op, ...] = ()

    @property
    def dense(self) -> int:
        """The multiply-adds of the unpruned model."""
        return int(self())

    def __call__(self, kept: Mapping[str, Any] | None = None):
        kept = {} if kept is None else kept
        if not isinstance(kept, Mapping):
            raise TypeError(f"kept must map group names to unit counts, got {type(kept).__name__}")
        for name, count in kept.items():
            if name not in self.sizes:
                raise ValueError(
                    f"kept names {name!r}, which is not a prunable group; prunable groups are "
                    f"{list(self.sizes)}"
                )
            if isinstance(count, (int, np.integer)) and not 0 <= count <= self.sizes[name]:
                raise ValueError(f"kept[{name!r}] must be in [0, {self.sizes[name]}], got {count}")
        return _eval(self.terms, kept, self.sizes)


def mac_count(analysis: Analysis) -> MacCount:
    tr = analysis.trace
    if tr.unsupported_macs:
        raise ValueError(
            "cannot count the multiply-adds of a forward pass with control flow "
            f"{sorted(set(tr.unsupported_macs))}"
        )
    names = {c: n for n, c in analysis.class_of.items() if analysis.groups[n].prunable}
    total: Poly = {}
    ops = []
    for factors, rec in zip(tr.mac_terms, tr.ops, strict=True):
        poly: Poly = {(): 1}
        for f in factors:
            poly = _mul(poly, {(): f} if isinstance(f, int) else _seq_poly(tr.atoms, f, names))
        total = _add(total, poly)
        shapes = tuple(
            tuple(_seq_poly(tr.atoms, seq, names) for seq in axes) for axes in rec.operands
        )
        groups_poly = (
            None if rec.feature_groups is None else _seq_poly(tr.atoms, rec.feature_groups, names)
        )
        used = {n for shape in shapes for p in shape for key in p for n in key}
        used |= {n for key in (groups_poly or {}) for n in key}
        ops.append(
            Op(
                rec.primitive,
                rec.params,
                shapes,
                tuple(rec.dtypes),
                groups_poly,
                {k: c for k, c in poly.items() if c},
                tuple(sorted(used)),
                tuple(rec.variables),
            )
        )
    total = {k: c for k, c in total.items() if c}
    sizes = {n: analysis.groups[n].size for n in names.values()}
    return MacCount(total, sizes, tuple(ops))
