"""Sparsity statistics of a params tree or a mask tree."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress._tree import is_none
from jaxcompress.masks._selection import Selector, leaf_size, path_str, prunable


@dataclasses.dataclass(frozen=True)
class LeafSparsity:
    """One row of a :class:`SparsitySummary`."""

    path: str
    shape: tuple[int, ...]
    count: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.count if self.count else 0.0


@dataclasses.dataclass(frozen=True)
class SparsitySummary:
    """Per-leaf and total sparsity over the selected leaves.

    ``zeros`` counts exact zeros of params, or ``False`` entries of masks. ``sparsity`` is
    ``total_zeros / total_count`` over the rows only (unselected leaves, e.g. biases and
    BatchNorm, are not in the denominator, as in the reference READMEs).
    """

    rows: tuple[LeafSparsity, ...]

    @property
    def total_count(self) -> int:
        return sum(r.count for r in self.rows)

    @property
    def total_zeros(self) -> int:
        return sum(r.zeros for r in self.rows)

    @property
    def sparsity(self) -> float:
        return self.total_zeros / self.total_count if self.total_count else 0.0

    def __str__(self) -> str:
        header = ("path", "shape", "count", "zeros", "sparsity")
        body = [
            (
                r.path,
                "x".join(map(str, r.shape)) or "()",
                str(r.count),
                str(r.zeros),
                f"{r.sparsity:.4f}",
            )
            for r in self.rows
        ]
        total = ("total", "", str(self.total_count), str(self.total_zeros), f"{self.sparsity:.4f}")
        table = [header, *body, total]
        widths = [max(len(row[c]) for row in table) for c in range(len(header))]

        def line(row):
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
            cells += [row[c].rjust(widths[c]) for c in range(2, len(header))]
            return "  ".join(cells).rstrip()

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([line(header), rule, *map(line, body), rule, line(total)])


def summary(params_or_masks: Any, *, where: Selector = prunable) -> SparsitySummary:
    """Sparsity table of a params tree or a mask tree (host-side; syncs with the device).

    Mask trees (any boolean leaf present): every boolean leaf is a row, ``None`` leaves are
    skipped and ``where`` is not consulted (the mask tree already encodes the selection);
    zeros are ``False`` entries. Params trees: a row for every leaf ``where`` selects; zeros
    are entries equal to 0.
    """
    leaves = jax.tree_util.tree_flatten_with_path(params_or_masks, is_leaf=is_none)[0]
    leaves = [(p, x) for p, x in leaves if x is not None]
    is_mask_tree = any(getattr(x, "dtype", None) == jnp.bool_ for _, x in leaves)
    if is_mask_tree:
        rows = [(p, x) for p, x in leaves if getattr(x, "dtype", None) == jnp.bool_]
    else:
        rows = [(p, x) for p, x in leaves if where(p, x)]
    zeros = jax.device_get([jnp.sum(jnp.logical_not(x.astype(bool))) for _, x in rows])
    return SparsitySummary(
        rows=tuple(
            LeafSparsity(path_str(p), tuple(x.shape), leaf_size(x), int(z))
            for (p, x), z in zip(rows, zeros, strict=True)
        )
    )
