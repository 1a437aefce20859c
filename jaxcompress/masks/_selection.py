"""Leaf selection: which parameters are pruned, and how leaf paths are spelled.

A *selector* is a callable ``(path, leaf) -> bool`` where ``path`` is a JAX key path (as
returned by :func:`jax.tree_util.tree_flatten_with_path`) and ``leaf`` an array (or anything
with ``shape`` and ``dtype``, e.g. :class:`jax.ShapeDtypeStruct`). Every function in
:mod:`jaxcompress.masks` takes one as ``where=``.

Flatten order. Whenever this package speaks of "first", "last" or "in order", it means the
order of :func:`jax.tree_util.tree_flatten_with_path`: dict keys (and ``nnx.State`` keys)
sorted, sequences by index, registered dataclasses/namedtuples by field order. Note that
sorting is lexicographic on strings, so ``'conv10'`` comes before ``'conv2'``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Selector = Callable[[tuple, Any], bool]

#: Names of leaves that hold a dense/conv kernel (matched against the last named key).
KERNEL_NAMES = frozenset({"kernel", "weight", "weights", "w"})


def _key_name(key: Any) -> str | int | None:
    """The name a single key-path entry stands for (str or int), or None if it has none."""
    if isinstance(key, jax.tree_util.DictKey):
        return key.key if isinstance(key.key, str | int) else str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return key.idx
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return key.key
    return None


def _strip_value(path: Sequence[Any]) -> tuple:
    """Drop a trailing ``GetAttrKey('value')`` (the ``nnx.Variable`` payload) from ``path``."""
    path = tuple(path)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        return path[:-1]
    return path


def path_str(path: Sequence[Any]) -> str:
    """Spell a key path as ``'a/b/0/kernel'``.

    A trailing ``GetAttrKey('value')`` (``nnx.State`` leaves) is dropped, so a Flax NNX
    ``conv1.kernel`` and a plain ``{'conv1': {'kernel': w}}`` both read ``'conv1/kernel'``.
    """
    parts = []
    for key in _strip_value(path):
        name = _key_name(key)
        parts.append(str(key) if name is None else str(name))
    return "/".join(parts)


def _last_name(path: Sequence[Any]) -> str | None:
    """The last string-named key of ``path`` (ignoring a trailing ``.value``)."""
    for key in reversed(_strip_value(path)):
        name = _key_name(key)
        if isinstance(name, str):
            return name
    return None


def is_floating(leaf: Any) -> bool:
    """True if ``leaf`` has a floating-point dtype."""
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def prunable(path: Sequence[Any], leaf: Any) -> bool:
    """Default selector: floating conv/dense kernels with ``ndim >= 2``.

    A leaf is selected when (1) its dtype is floating point, (2) ``ndim >= 2`` and (3) its
    last named key (a trailing ``GetAttrKey('value')`` from ``nnx.State`` is skipped) is one
    of :data:`KERNEL_NAMES` (``'kernel'``, ``'weight'``, ``'weights'``, ``'w'``). Biases,
    norm scales/offsets and embeddings (``'embedding'``, ``'embed'``) are therefore never
    selected. This matches the reference CrAM/AC-DC scope (every ``ndim > 1`` conv/linear
    weight, first conv and classifier included).
    """
    shape = getattr(leaf, "shape", None)
    if shape is None or len(shape) < 2 or not is_floating(leaf):
        return False
    return _last_name(path) in KERNEL_NAMES


def _compile_patterns(arg: str, patterns: str | Iterable[str] | None) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{arg}: expected regex strings, got {pattern!r}")
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"{arg}: invalid regular expression {pattern!r}: {err}") from err
    return compiled


def select(
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    base: Selector = prunable,
) -> Selector:
    """Build a selector from regular expressions over :func:`path_str`.

    A leaf is selected iff ``base(path, leaf)`` is true, ``include`` is None or one of its
    patterns matches (``re.search``) ``path_str(path)``, and no ``exclude`` pattern matches.

    Example: ``select(exclude=r"^(conv1|fc)/")`` keeps the stem and classifier dense.
    """
    inc = _compile_patterns("include", include)
    exc = _compile_patterns("exclude", exclude)
    if not callable(base):
        raise TypeError(f"base: expected a selector (path, leaf) -> bool, got {base!r}")

    def selector(path: tuple, leaf: Any) -> bool:
        if not base(path, leaf):
            return False
        name = path_str(path)
        if inc and not any(p.search(name) for p in inc):
            return False
        return not any(p.search(name) for p in exc)

    return selector


def exclude_first_last(params: Any, where: Selector = prunable) -> Selector:
    """A selector like ``where`` that leaves the first and the last selected leaf unpruned.

    "First" and "last" follow the flatten order of
    :func:`jax.tree_util.tree_flatten_with_path` (sorted dict keys; see the module docstring),
    which for typical models is *not* the execution order: check with :func:`path_str` on
    your tree, or use :func:`select` with explicit names. Mirrors the "uniform" configs of
    the CrAM and AC/DC reference code (Peste et al. 2021, 2023), which keep the stem conv and
    the classifier dense.
    """
    chosen = [path_str(p) for p, leaf in selected_leaves(params, where)]
    dropped = {chosen[0], chosen[-1]} if chosen else set()

    def selector(path: tuple, leaf: Any) -> bool:
        return bool(where(path, leaf)) and path_str(path) not in dropped

    return selector


def selected_leaves(params: Any, where: Selector) -> list[tuple[tuple, Any]]:
    """``(path, leaf)`` pairs selected by ``where``, in flatten order."""
    if not callable(where):
        raise TypeError(f"where: expected a selector (path, leaf) -> bool, got {where!r}")
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return [(p, x) for p, x in leaves if where(p, x)]


def check_selected_floating(path: Sequence[Any], leaf: Any) -> None:
    """Raise TypeError if a selected leaf is not a floating-point array."""
    if not is_floating(leaf):
        raise TypeError(
            f"where: leaf {path_str(path)!r} with dtype {getattr(leaf, 'dtype', type(leaf))} "
            "was selected for pruning; expected a floating-point array (integer, bool and "
            "complex leaves cannot be pruned by magnitude)"
        )


def leaf_size(leaf: Any) -> int:
    return int(np.prod(leaf.shape, dtype=np.int64))


class EmptySelectionWarning(UserWarning):
    """A mask function selected no leaf, so its result prunes nothing.

    Raised as an error instead with ``strict=True``. Filter it with
    ``warnings.simplefilter("ignore", EmptySelectionWarning)`` where an empty selection is
    expected (e.g. a model without dense or conv kernels).
    """


def _empty_selection_reason(leaves: list[tuple[tuple, Any]], where: Selector) -> str:
    """Why ``where`` selected none of ``leaves``: a sentence for the warning/error."""
    if not leaves:
        return "params has no leaves (an empty tree)"
    if where is not prunable:
        names = [path_str(p) for p, _ in leaves]
        return f"where selected none of its {len(leaves)} leaves (e.g. {names[:4]})"
    kernels, unknown = [], []
    for path, leaf in leaves:
        shape = getattr(leaf, "shape", None)
        if shape is None or len(shape) < 2:
            continue
        if _last_name(path) in KERNEL_NAMES:
            kernels.append(f"{path_str(path)} ({getattr(leaf, 'dtype', type(leaf).__name__)})")
        else:
            unknown.append(path_str(path))
    parts = [f"the default selector `prunable` accepted none of the {len(leaves)} leaves"]
    if kernels:
        parts.append(
            f"leaves named like kernels but not floating point, never pruned: {kernels[:4]}"
        )
    if unknown:
        parts.append(
            f"leaves with ndim >= 2 whose last key is not one of {sorted(KERNEL_NAMES)}: "
            f"{unknown[:4]} (pass where= a selector that accepts them)"
        )
    if not kernels and not unknown:
        parts.append("no leaf has ndim >= 2")
    return "; ".join(parts)


def check_selection(
    fn: str,
    leaves: list[tuple[tuple, Any]],
    chosen: Sequence[int],
    where: Selector,
    strict: bool,
    reason: str | None = None,
) -> None:
    """Warn (or raise with ``strict=True``) when ``chosen`` is empty: nothing would be pruned.

    ``leaves`` are the ``(path, leaf)`` pairs of the params, ``chosen`` the indices selected;
    ``reason`` replaces the diagnosis derived from ``where``.
    """
    if not isinstance(strict, bool):
        raise TypeError(f"strict: expected a bool, got {type(strict).__name__} {strict!r}")
    if chosen:
        return
    if reason is None:
        reason = _empty_selection_reason(leaves, where)
    msg = f"{fn}: no leaf selected, so the result prunes nothing: {reason}"
    if strict:
        raise ValueError(msg)
    warnings.warn(msg + " (strict=True raises instead)", EmptySelectionWarning, stacklevel=3)
