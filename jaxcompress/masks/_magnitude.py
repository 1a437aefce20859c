"""Magnitude (Top-K) masks, per layer or global, with a shard-local exact threshold search.

Rule. For a group of ``N`` selected weights (one leaf for ``scope="layer"``, all selected
leaves together for ``scope="global"``) and sparsity ``s``, keep

    k_keep = ceil(N * (1 - s))

weights with the largest ``|w|`` (Zhu & Gupta 2017; CrAM, Peste et al. 2023, Sec. 3;
AC/DC, Peste et al. 2021, Sec. 3). Two tie rules:

* default (exact count): exactly ``k_keep`` entries are kept. Entries are ranked by
  ``|w|`` descending, then by position ascending, where position is the flatten order of
  the leaves (:mod:`jaxcompress.masks._selection`) followed by the row-major flat index
  inside a leaf. So among equal magnitudes the earlier leaf, then the lower flat index,
  is kept.
* ``reference_ties=True``: the rule of the CrAM and AC/DC reference code (IST-DASLab):
  ``thr`` is the ``k_keep``-th largest ``|w|`` and ``mask = |w| > thr`` (strict). Without
  ties that keeps ``k_keep - 1`` entries; with ties fewer. ``k_keep = 0`` keeps nothing.

Magnitudes are compared as float32 (bf16/f16 are widened exactly; float64 is rounded to
float32, so float64 values closer than a float32 ulp count as ties). NaN ranks above inf.

Counting ``k_keep``. ``s`` may be a Python float or a (possibly traced) scalar array.

* Python float: ``k_keep = ceil(N (1 - s) - N 2^-40)`` evaluated exactly (fractions). The
  tiny slack absorbs the binary representation error of decimal sparsities: ``s = 0.7``,
  ``N = 10`` keeps 3, not 4.
* Array: computed on device in float32 as ``N - floor(N s + min(N 2^-25, 1/2))`` (the slack
  covers the representation error of a float32 ``s``). It agrees with the Python rule for
  ``N <= 2^18`` at sparsities with two decimals (three decimals: ``N <= 10^4``); for larger
  ``N`` the float32 resolution of ``s`` itself (``float32(0.9) = 0.89999998``) can move
  the count by about ``N 2^-23`` (at most 2 entries at 25M, checked on a grid). Traced
  values are not range-checked.

Shard-local threshold. The threshold is found without gathering the weights: ``|w|`` is
bit-cast to its int32 pattern (monotone for non-negative floats), and a bisection over the
31-bit pattern finds the largest ``t`` with ``#{bits >= t} >= k_keep`` (31 rounds). Every
round needs only ``jnp.sum`` of a comparison per leaf, which XLA's SPMD partitioner lowers
to a local reduction plus an all-reduce of one scalar, so on sharded params each device
reads only its own shard and outputs keep the params' shardings. If the entries equal to
the threshold must be split (default rule only), a second bisection over the flat index
inside each leaf finds how many of them to keep, in the tie order above (skipped by
``lax.cond`` when there is nothing to split). Cost: ``O(N)`` work per round, no sort, and
temporary memory of about two int32 copies of the local shard (keys are recomputed in
each round rather than stored, so XLA fuses them into the reductions).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcompress._tree import is_none
from jaxcompress.masks._selection import (
    Selector,
    check_selected_floating,
    check_selection,
    leaf_size,
    path_str,
    prunable,
)

_SCOPES = ("global", "layer")
_INT32_MAX = np.iinfo(np.int32).max


# ----------------------------------------------------------------------------- counts


def _is_python_number(x: Any) -> bool:
    return isinstance(x, int | float | np.floating | np.integer) and not isinstance(x, bool)


def _host_float(value: Any) -> float:
    """A concrete scalar as a Python float; float32/float16 through their shortest decimal.

    ``np.float32(0.7)`` is 0.699999988...; read as a float64 it would make
    :func:`keep_count` keep one entry more than ``0.7`` does. Its shortest round-trip decimal
    (``'0.7'``) is what the caller wrote.
    """
    x = np.asarray(value)[()]
    if isinstance(x, np.float32 | np.float16):
        return float(str(x))
    return float(x)


def check_sparsity(value: Any, argname: str = "sparsity", where: str = "") -> Any:
    """Validate a sparsity: Python/NumPy numbers must lie in [0, 1); arrays must be scalars.

    Returns a Python float or a scalar array. Concrete arrays are range-checked too; traced
    values are not (no host sync).
    """
    at = f" for leaf {where!r}" if where else ""
    if _is_python_number(value):
        s = _host_float(value)
        if not (0.0 <= s < 1.0) or math.isnan(s):
            raise ValueError(f"{argname}{at}: expected a value in [0, 1), got {s!r}")
        return s
    if isinstance(value, jax.Array | np.ndarray):
        if value.shape != ():
            raise ValueError(
                f"{argname}{at}: expected a scalar, got an array of shape {value.shape}"
            )
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(f"{argname}{at}: expected a floating scalar, got dtype {value.dtype}")
        if not isinstance(value, jax.core.Tracer):
            s = float(value)
            if not (0.0 <= s < 1.0):  # also rejects NaN
                raise ValueError(f"{argname}{at}: expected a value in [0, 1), got {s!r}")
        return value
    raise TypeError(
        f"{argname}{at}: expected a float in [0, 1) or a scalar array, got {type(value).__name__} "
        f"{value!r}"
    )


def keep_count(n: int, sparsity: float) -> int:
    """Entries kept of ``n`` at ``sparsity``: ``ceil(n (1 - s))``, exact for decimal ``s``.

    Computed in rational arithmetic as ``ceil(n (1 - s) - n 2^-40)``, so the binary
    representation error of a decimal sparsity does not add a weight (``keep_count(10, 0.7)``
    is 3, where a float ``ceil(10 * 0.30000000000000004)`` gives 4).

    Args:
      n: the number of entries, an int >= 0.
      sparsity: fraction pruned in [0, 1): a Python/NumPy number or a concrete scalar array
        (use ``keep_count_array`` inside ``jit``).

    Raises:
      TypeError: ``n`` not an int; ``sparsity`` not a real number or is a traced value.
      ValueError: ``n < 0``; ``sparsity`` outside [0, 1) or NaN.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer):
        raise TypeError(f"n: expected an int >= 0 (an entry count), got {type(n).__name__} {n!r}")
    if n < 0:
        raise ValueError(f"n: expected an int >= 0 (an entry count), got {n!r}")
    if isinstance(sparsity, jax.core.Tracer):
        raise TypeError(
            "sparsity: keep_count needs a concrete value (it runs on the host); got a traced "
            "array. Inside jit, pass the sparsity to magnitude(), which counts on the device"
        )
    s = _host_float(check_sparsity(sparsity))
    x = Fraction(int(n)) * (1 - Fraction(s)) - Fraction(int(n), 2**40)
    return min(max(math.ceil(x), 0), int(n))


def keep_count_array(n: int, sparsity: jax.Array) -> jax.Array:
    """Device version of :func:`keep_count` for a scalar array (float32 arithmetic), int32."""
    s = jnp.asarray(sparsity, jnp.float32)
    nf = jnp.float32(n)
    pruned = jnp.floor(nf * s + jnp.float32(min(n * 2.0**-25, 0.5)))
    pruned = jnp.clip(pruned, 0.0, nf).astype(jnp.int32)
    return jnp.int32(n) - pruned


def _keep(n: int, sparsity: Any) -> jax.Array:
    if isinstance(sparsity, float):
        return jnp.int32(keep_count(n, sparsity))
    return keep_count_array(n, sparsity)


# ----------------------------------------------------------------------------- search


def magnitude_keys(w: jax.Array) -> jax.Array:
    """Non-negative int32 sort keys of ``|w|``: bit patterns, monotone in ``|w|``."""
    return lax.bitcast_convert_type(jnp.abs(w).astype(jnp.float32), jnp.int32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major flat index of every entry, built from iotas (partitions without gathers)."""
    idx = jnp.zeros(shape, jnp.int32)
    stride = 1
    for dim in reversed(range(len(shape))):
        idx = idx + lax.broadcasted_iota(jnp.int32, shape, dim) * jnp.int32(stride)
        stride *= shape[dim]
    return idx


class _LazyKeys:
    """``keys[i]`` is ``magnitude_keys(values[i])``, built afresh at every access."""

    def __init__(self, values: list[jax.Array]):
        self._values = values

    def __len__(self) -> int:
        return len(self._values)

    def __getitem__(self, i: int) -> jax.Array:
        return magnitude_keys(self._values[i])

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def _group_sum(per_leaf: jax.Array, group_of_leaf: np.ndarray, num_groups: int) -> jax.Array:
    if num_groups == 1:
        return jnp.sum(per_leaf, keepdims=True)
    if num_groups == per_leaf.shape[0] and np.array_equal(group_of_leaf, np.arange(num_groups)):
        return per_leaf
    return jax.ops.segment_sum(per_leaf, jnp.asarray(group_of_leaf), num_segments=num_groups)


def topk_masks(
    values: list[jax.Array],
    group_of_leaf: tuple[int, ...],
    k_keep: jax.Array,
    *,
    reference_ties: bool = False,
) -> list[jax.Array]:
    """Boolean masks keeping the ``k_keep[g]`` largest keys of each group ``g``.

    ``values`` are float arrays ranked by :func:`magnitude_keys`; leaf ``i`` belongs
    to group ``group_of_leaf[i]``; ``k_keep`` is an int32 vector, one entry per group. See
    the module docstring for the algorithm and the tie rules.
    """
    gid = np.asarray(group_of_leaf, np.int32)
    # Keys are recomputed at each use (not stored), so XLA fuses abs/bitcast/compare/sum
    # into one pass and no int32 copy of the weights is kept alive across the loops.
    keys = _LazyKeys(values)
    num_groups = int(k_keep.shape[0])

    def counts(pred) -> jax.Array:
        per_leaf = jnp.stack([jnp.sum(pred(i, key), dtype=jnp.int32) for i, key in enumerate(keys)])
        return _group_sum(per_leaf, gid, num_groups)

    # Largest t with #{key >= t} >= k. Invariant: count(lo) >= k and answer <= hi.
    def value_round(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2
        ok = counts(lambda i, key: key >= mid[gid[i]]) >= k_keep
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo = jnp.zeros((num_groups,), jnp.int32)
    hi = jnp.full((num_groups,), _INT32_MAX, jnp.int32)
    thr, _ = lax.fori_loop(0, 31, value_round, (lo, hi))

    above = [key > thr[gid[i]] for i, key in enumerate(keys)]
    if reference_ties:
        return above

    # Split the entries equal to the threshold: quota per leaf in leaf order within a group.
    n_above = _group_sum(jnp.stack([jnp.sum(a, dtype=jnp.int32) for a in above]), gid, num_groups)
    n_equal = jnp.stack(
        [jnp.sum(key == thr[gid[i]], dtype=jnp.int32) for i, key in enumerate(keys)]
    )
    remaining = k_keep - n_above  # ties still to keep, per group (>= 0)
    quotas, before = [], [jnp.int32(0)] * num_groups
    for i in range(len(keys)):
        g = gid[i]
        quotas.append(jnp.clip(remaining[g] - before[g], 0, n_equal[i]))
        before[g] = before[g] + n_equal[i]
    quota = jnp.stack(quotas)
    sizes = np.array([v.size for v in values], np.int32)

    def split_ties(_):
        # Smallest P with #{equal & index < P} >= quota, per leaf.
        flat = [_flat_index(v.shape) for v in values]
        rounds = max(int(sizes.max()), 1).bit_length()

        def index_round(_, bounds):
            lo, hi = bounds
            mid = (lo + hi) // 2
            got = jnp.stack(
                [
                    jnp.sum((key == thr[gid[i]]) & (flat[i] < mid[i]), dtype=jnp.int32)
                    for i, key in enumerate(keys)
                ]
            )
            ok = got >= quota
            return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

        lo = jnp.zeros((len(keys),), jnp.int32)
        _, cut = lax.fori_loop(0, rounds, index_round, (lo, jnp.asarray(sizes)))
        return cut

    cut = lax.cond(jnp.any(quota < n_equal), split_ties, lambda _: jnp.asarray(sizes), operand=None)
    return [
        above[i] | ((key == thr[gid[i]]) & (_flat_index(key.shape) < cut[i]))
        for i, key in enumerate(keys)
    ]


# One compiled program per (shapes, groups) signature, also when called eagerly; inside an
# outer jit it is inlined like any nested jit.
_topk_masks_jit = jax.jit(topk_masks, static_argnames=("group_of_leaf", "reference_ties"))


# ----------------------------------------------------------------------------- public


def _per_leaf_sparsity(params: Any, sparsity: Any) -> list[Any]:
    """Flatten a per-leaf sparsity tree against params, checking structure and values."""
    s_leaves = jax.tree_util.tree_flatten_with_path(sparsity, is_leaf=is_none)[0]
    p_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    s_paths = [path_str(p) for p, _ in s_leaves]
    p_paths = [path_str(p) for p, _ in p_leaves]
    if s_paths != p_paths:
        missing = [p for p in p_paths if p not in set(s_paths)][:5]
        extra = [p for p in s_paths if p not in set(p_paths)][:5]
        raise ValueError(
            "sparsity: per-leaf tree does not mirror params (expected one None/float per param "
            f"leaf); missing leaves: {missing}, unexpected leaves: {extra}"
        )
    return [None if s is None else check_sparsity(s, where=path_str(p)) for p, s in s_leaves]


def magnitude(
    params: Any,
    sparsity: Any,
    *,
    scope: str = "global",
    where: Selector = prunable,
    reference_ties: bool = False,
    strict: bool = False,
) -> Any:
    """Magnitude (Top-K) mask tree: keep the ``ceil(N (1 - s))`` largest ``|w|``.

    Exactly that many entries are kept per group (per leaf, or over all selected leaves).
    Ties in ``|w|`` are broken by position: the earlier leaf in flatten order, then the
    lower row-major flat index, is kept. Details, and the reference's strict rule, in the
    module docstring of ``jaxcompress.masks._magnitude``.

    Args:
      params: a pytree of arrays (dict, ``nnx.State``, ...), possibly sharded.
      sparsity: fraction pruned, in [0, 1). A Python float, a scalar array (may be traced:
        ``jax.jit`` with the sparsity as an argument does not recompile when only its value
        changes), or, for ``scope="layer"`` only, a tree mirroring ``params`` with a
        float/scalar or ``None`` per leaf (a leaf is pruned iff ``where`` selects it and its
        entry is not None; see :func:`jaxcompress.masks.erk`).
      scope: ``"global"`` (one threshold over all selected leaves, as the reference CrAM
        and AC/DC) or ``"layer"`` (one threshold per leaf, the "uniform" configs).
      where: selector ``(path, leaf) -> bool``; default :func:`prunable`.
      reference_ties: use the reference's strict ``|w| > thr`` rule instead of the exact
        count (see the module docstring).
      strict: raise a ``ValueError`` instead of an :class:`EmptySelectionWarning` when no
        leaf is selected (the result would prune nothing).

    Returns:
      A mask tree: a bool array (True = kept) per selected leaf, None elsewhere.

    Warns:
      EmptySelectionWarning: no leaf selected (empty tree, unrecognised kernel names,
        non-floating kernels, every per-leaf sparsity None); the reason is in the message.

    Raises:
      ValueError: unknown ``scope``, a sparsity outside [0, 1), a per-leaf tree that does
        not mirror params or is used with ``scope="global"``, more than 2^31 - 1 selected
        entries in one group.
      TypeError: a selected leaf that is not floating point; a sparsity of the wrong type.
    """
    if scope not in _SCOPES:
        raise ValueError(f"scope: expected one of {_SCOPES}, got {scope!r}")
    if not callable(where):
        raise TypeError(f"where: expected a selector (path, leaf) -> bool, got {where!r}")
    if not isinstance(reference_ties, bool):
        raise TypeError(f"reference_ties: expected a bool, got {reference_ties!r}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict: expected a bool, got {type(strict).__name__} {strict!r}")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    is_tree = not (_is_python_number(sparsity) or isinstance(sparsity, jax.Array | np.ndarray))
    if is_tree and (
        sparsity is None or jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(sparsity))
    ):
        check_sparsity(sparsity)  # a scalar of the wrong type: raises TypeError
    if is_tree:
        if scope != "layer":
            raise ValueError(
                f"sparsity: a per-leaf sparsity tree needs scope='layer', got scope={scope!r}"
            )
        per_leaf = _per_leaf_sparsity(params, sparsity)
    else:
        per_leaf = [check_sparsity(sparsity)] * len(leaves)

    chosen = []
    for i, (path, leaf) in enumerate(leaves):
        if per_leaf[i] is None or not where(path, leaf):
            continue
        check_selected_floating(path, leaf)
        chosen.append(i)
    reason = None
    if is_tree and not chosen and any(where(p, x) for p, x in leaves):
        reason = "every selected leaf has a None per-leaf sparsity"
    check_selection("magnitude", leaves, chosen, where, strict, reason)
    out: list[Any] = [None] * len(leaves)
    if not chosen:
        return jax.tree_util.tree_unflatten(treedef, out)

    sizes = [leaf_size(leaves[i][1]) for i in chosen]
    if scope == "global":
        groups = (0,) * len(chosen)
        total = sum(sizes)
        if total > _INT32_MAX:
            raise ValueError(
                f"params: {total} selected entries exceed 2^31 - 1 for scope='global'; "
                "prune in several calls or use scope='layer'"
            )
        k_keep = _keep(total, per_leaf[chosen[0]])[None]
    else:
        groups = tuple(range(len(chosen)))
        for i, n in zip(chosen, sizes, strict=True):
            if n > _INT32_MAX:
                raise ValueError(
                    f"params: leaf {path_str(leaves[i][0])!r} has {n} > 2^31 - 1 entries"
                )
        k_keep = jnp.stack([_keep(n, per_leaf[i]) for i, n in zip(chosen, sizes, strict=True)])

    masks = topk_masks(
        [leaves[i][1] for i in chosen], groups, k_keep, reference_ties=reference_ties
    )
    for i, mask in zip(chosen, masks, strict=True):
        out[i] = mask
    return jax.tree_util.tree_unflatten(treedef, out)
