"""Pytree utilities shared by the library (no jaxcompress imports).

A mask tree has ``None`` where a param leaf is not pruned; mapping over it together with the
params needs ``is_leaf=is_none`` so that ``None`` stands for a whole param leaf instead of an
empty subtree.
"""

from __future__ import annotations

from typing import Any

__all__ = ["is_none"]


def is_none(x: Any) -> bool:
    """``x is None``: the ``is_leaf`` of every map over a mask tree."""
    return x is None
