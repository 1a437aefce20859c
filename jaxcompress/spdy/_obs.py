r"""Layer-wise OBS reconstruction (SparseGPT's solver) and SPDY's OBS database.

References: E. Frantar and D. Alistarh, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot", ICML 2023 (arXiv:2301.00774), Algorithm 1; E. Frantar, S. P. Singh and
D. Alistarh, "Optimal Brain Compression", NeurIPS 2022 (arXiv:2208.11580), the database of
Sec. 5; E. Frantar and D. Alistarh, "SPDY", ICML 2022 (arXiv:2201.13096).

**The layer problem.** A Dense kernel ``W`` has the Flax layout ``(d_in, d_out)``, ``y = x W``.
With the layer's calibration inputs ``X`` (``n x d_in``) and ``H = 2 X^T X / n``, find a mask
``M`` and kept weights ``W'`` that make ``|| X W - X (M * W') ||_F^2`` small. The problem
separates per output column (per column of the Flax kernel; a row of the papers' ``(out, in)``
layout).

**SparseGPT sweep** (:func:`sparsegpt_layer`; the papers' "columns" are our rows):

1. dead inputs (``H_ii = 0``): ``H_ii := 1`` and row ``i`` of ``W`` is zeroed;
   dampening ``H += percdamp * mean(diag H) * I``;
2. ``U`` = the upper Cholesky factor of ``H^{-1}`` (``H^{-1} = U^T U``). It is computed as
   ``U = J L^{-1} J`` with ``J`` the order-reversing permutation and ``L`` the lower Cholesky
   factor of ``J H J`` (one factorisation and one triangular inverse, by recursive 2 x 2
   blocks so that the work is in matmuls; the same matrix as the reference's Cholesky of the
   explicit inverse);
3. rows are visited in order, in blocks of ``blocksize`` rows. Unstructured: at the start of a
   block its mask is chosen from the OBS saliency ``W_rc^2 / U_rr^2`` of the current (already
   updated) weights: exactly ``B d_out - ceil(B d_out (1 - s))`` entries of the block's
   ``B x d_out`` are pruned, the smallest saliencies, ties to the lower row-major index. N:M:
   at every row ``r`` with ``r % m == 0``, for each output column, the ``n`` entries of rows
   ``r .. r+m-1`` with the largest saliency are kept (ties to the lower row);
4. row ``r``: ``q = keep_r * W_r``, ``e = (W_r - q) / U_rr``, ``W_{r:} -= U_{r, r:}^T e``
   (only the rows after ``r`` change; row ``r`` becomes ``q``); after a block, the later rows
   receive ``W_{i2:} -= U_{i1:i2, i2:}^T E`` at once (lazy batch update).

For one pruned weight ``w_q`` this is the OBS update ``dW = -(w_q / [H^{-1}]_{qq})
H^{-1}_{:, q}`` (``U_{q, r} / U_{qq} = [H^{-1}]_{qr} / [H^{-1}]_{qq}`` for the first row).
The lazy update is also applied inside a block, in sub-blocks of 16 rows, which changes only
the order of floating-point operations, not the algorithm. The whole sweep is one jitted
program per (shape, block size, N:M) with ``lax.fori_loop`` over rows; the sparsity is data.

**OBS database** (:func:`obs_database`): for every layer one factorisation of its Hessian, then
sparsity levels ``s_1 < s_2 < ...`` pruned progressively: level ``j`` runs the sweep on level
``j - 1``'s reconstructed kernel with level ``j - 1``'s pruned entries forced out (so masks are
nested, as in OBC's and SPDY's databases), N:M options one sweep each from the dense kernel.
Errors are the normalised output errors computed from the Hessian,
``tr(dW^T H dW) / tr(W^T H W) = ||X dW||^2 / ||X W||^2``.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.linalg import solve_triangular

from jaxcompress.masks import keep_count, path_str
from jaxcompress.spdy._reconstruct import Database, Entries

__all__ = [
    "NotPositiveDefiniteError",
    "Stitcher",
    "hessian_error",
    "obs_database",
    "sparsegpt_layer",
    "stitcher",
]

_HI = lax.Precision.HIGHEST
#: Rows per sub-block of the in-block lazy update (an implementation detail, see above).
_SUB = 16
#: Blocks per superblock (see ``_sweep``).
_SUPER = 4
#: Largest matrix factorised by LAPACK directly in ``_cholesky_inverse``.
_BASE = 128


class NotPositiveDefiniteError(ValueError):
    """The dampened Hessian of a layer has no Cholesky factor (raise ``percdamp``)."""


# --------------------------------------------------------------------------------------
# Argument checks (shared with jaxcompress.prune).
# --------------------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_criterion(sparsity: Any, n: Any, m: Any, fn: str) -> tuple[float | None, Any]:
    """Validate "exactly one of sparsity or n:m"; returns ``(sparsity, (n, m) or None)``."""
    use_s = sparsity is not None
    use_nm = n is not None or m is not None
    if use_s == use_nm:
        raise ValueError(
            f"{fn}: give exactly one criterion, either sparsity=... or n=... and m=...; got "
            f"sparsity={sparsity!r}, n={n!r}, m={m!r}"
        )
    if use_s:
        if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
            raise TypeError(f"{fn}: sparsity must be a float in [0, 1), got {sparsity!r}")
        if not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"{fn}: sparsity must be in [0, 1), got {sparsity!r}")
        return float(sparsity), None
    if n is None or m is None:
        raise ValueError(f"{fn}: N:M pruning needs both n and m, got n={n!r}, m={m!r}")
    if not _is_int(n) or not _is_int(m):
        raise TypeError(f"{fn}: n and m must be ints, got n={n!r}, m={m!r}")
    if not 0 < n < m:
        raise ValueError(f"{fn}: N:M pruning needs 0 < n < m, got n={n!r}, m={m!r}")
    return None, (int(n), int(m))


def check_solver_args(blocksize: Any, percdamp: Any, nm: Any, fn: str) -> tuple[int, float]:
    """Validate ``blocksize`` (positive, a multiple of ``m``) and ``percdamp`` (> 0)."""
    if not _is_int(blocksize) or blocksize < 1:
        raise ValueError(f"{fn}: blocksize must be a positive int, got {blocksize!r}")
    if nm is not None and blocksize % nm[1]:
        raise ValueError(
            f"{fn}: blocksize={blocksize} must be divisible by m={nm[1]} (N:M groups may not "
            "straddle a block)"
        )
    if isinstance(percdamp, bool) or not isinstance(percdamp, numbers.Real):
        raise TypeError(f"{fn}: percdamp must be a positive float, got {percdamp!r}")
    if not math.isfinite(float(percdamp)) or float(percdamp) <= 0:
        raise ValueError(
            f"{fn}: percdamp must be > 0 (dampening percdamp * mean(diag H) keeps H invertible), "
            f"got {percdamp!r}"
        )
    return int(blocksize), float(percdamp)


# --------------------------------------------------------------------------------------
# Selection helpers (no sort: XLA's CPU sort is slow at these sizes).
# --------------------------------------------------------------------------------------


def _int_keys(x: jax.Array) -> jax.Array:
    """Order-preserving integer keys of a non-negative float array (NaN counts as +inf)."""
    int_dtype = jnp.int64 if x.dtype == jnp.float64 else jnp.int32
    x = x if x.dtype in (jnp.float32, jnp.float64) else x.astype(jnp.float32)
    x = jnp.where(jnp.isnan(x), jnp.inf, jnp.maximum(x, 0))
    return lax.bitcast_convert_type(x, int_dtype)


def _key_bounds(keys: jax.Array) -> tuple[int, int, int]:
    """(low, high, rounds): keys lie in [-1, +inf bits]; -1 marks entries pruned first."""
    top = 0x7FF0000000000000 if keys.dtype == jnp.int64 else 0x7F800000
    return -1, top, (top + 1).bit_length()


def _threshold(keys: jax.Array, k: jax.Array) -> jax.Array:
    """Per row of ``keys`` ``(G, N)``, the smallest ``t`` with ``#{key <= t} >= k``."""
    low, high, rounds = _key_bounds(keys)
    kd = keys.dtype
    if keys.shape[0] == 1:  # one group: scalar bounds, a plain 1-D count per round
        flat, k0 = keys.reshape(-1), k[0]

        def body1(_, bounds):
            lo, hi = bounds
            mid = lo + (hi - lo) // 2
            ok = jnp.sum(flat <= mid, dtype=jnp.int32) >= k0
            return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

        t, _ = lax.fori_loop(0, rounds, body1, (jnp.asarray(low, kd), jnp.asarray(high, kd)))
        return t[None]

    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(keys <= mid[:, None], axis=1, dtype=jnp.int32) >= k
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    g = keys.shape[0]
    t, _ = lax.fori_loop(0, rounds, body, (jnp.full((g,), low, kd), jnp.full((g,), high, kd)))
    return t


def prune_smallest(keys: jax.Array, k: jax.Array) -> jax.Array:
    """Boolean ``(G, N)``: the ``k`` smallest keys of each row pruned (ties: lower index first).

    ``keys`` are integer keys from :func:`_int_keys` (or ``-1``: pruned before any other),
    ``k`` a scalar or ``(G,)`` int count. A bisection over the key range (31 or 63 rounds of one
    compare-and-count pass) finds the ``k``-th smallest key; its ties, when some of them must
    be kept, are split by a cumulative count in index order (skipped otherwise).
    """
    k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), (keys.shape[0],))
    t = _threshold(keys, k)[:, None]
    below, equal = keys < t, keys == t
    need = k - jnp.sum(below, axis=1, dtype=jnp.int32)
    split = jnp.any(need < jnp.sum(equal, axis=1, dtype=jnp.int32))

    def ties(_):
        return below | (equal & (jnp.cumsum(equal, axis=1, dtype=jnp.int32) <= need[:, None]))

    return lax.cond(split, ties, lambda _: below | equal, None)


def _nm_keep(sal: jax.Array, n: int) -> jax.Array:
    """Keep the ``n`` largest of each column of ``sal`` (``(m, C)``), ties to the lower row."""
    m = sal.shape[0]
    a, b = sal[:, None, :], sal[None, :, :]  # entry i, entry j
    earlier = (jnp.arange(m)[None, :] < jnp.arange(m)[:, None])[:, :, None]  # j before i
    rank = jnp.sum((b > a) | ((b == a) & earlier), axis=1)
    return rank < n


# --------------------------------------------------------------------------------------
# The sweep.
# --------------------------------------------------------------------------------------


def _prepare(w: jax.Array, h: jax.Array, percdamp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dead inputs (``H_ii = 0``: ``H_ii := 1``, row zeroed), then dampening."""
    dead = jnp.diagonal(h) == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    w = jnp.where(dead[:, None], jnp.zeros((), w.dtype), w)
    damp = percdamp.astype(h.dtype) * jnp.mean(jnp.diagonal(h))
    return w, h + damp * jnp.eye(h.shape[0], dtype=h.dtype)


def _cholesky_inverse(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(L, L^{-1})`` with ``a = L L^T``, ``L`` lower: recursive 2 x 2 blocks.

    ``L11, M11 = rec(A11)``; ``L21 = A21 M11^T``; ``L22, M22 = rec(A22 - L21 L21^T)``;
    ``M21 = -M22 L21 M11``. Below ``_BASE`` rows: LAPACK's Cholesky and a triangular solve.
    About ``4/3 n^3`` flops, nearly all in matmuls (a triangular solve against the identity
    costs ``n^3`` flops at a fraction of matmul speed on CPU). A failed factorisation shows as
    non-finite entries.
    """
    n = a.shape[0]
    if n <= _BASE:
        low = jnp.linalg.cholesky(a)
        return low, solve_triangular(low, jnp.eye(n, dtype=a.dtype), lower=True)
    k = n // 2
    l11, m11 = _cholesky_inverse(a[:k, :k])
    l21 = jnp.matmul(a[k:, :k], m11.T, precision=_HI)
    l22, m22 = _cholesky_inverse(a[k:, k:] - jnp.matmul(l21, l21.T, precision=_HI))
    m21 = -jnp.matmul(m22, jnp.matmul(l21, m11, precision=_HI), precision=_HI)
    zeros = jnp.zeros((k, n - k), a.dtype)
    low = jnp.block([[l11, zeros], [l21, l22]])
    return low, jnp.block([[m11, zeros], [m21, m22]])


def _inverse_cholesky(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Upper ``U`` with ``H^{-1} = U^T U``, and whether the factorisation succeeded."""
    _, inv = _cholesky_inverse(h[::-1, ::-1])
    ok = jnp.all(jnp.isfinite(inv)) & jnp.all(jnp.diagonal(inv) > 0)
    return jnp.triu(inv[::-1, ::-1]), ok


@functools.partial(jax.jit, static_argnames=("blocksize",))
def _factor(w, h, percdamp, *, blocksize):
    """Prepared, row-padded kernel and ``U`` (padded with identity), and the PD flag."""
    d = w.shape[0]
    w, h = _prepare(w, h, percdamp)
    u, ok = _inverse_cholesky(h)
    pad = -d % blocksize
    if pad:
        w = jnp.pad(w, ((0, pad), (0, 0)))
        u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(
            jnp.concatenate([jnp.zeros(d, u.dtype), jnp.ones(pad, u.dtype)])
        )
    return w, u, ok


def _rows(ws, us, ks, es, *, step, nm):
    """Sequential OBS over the rows of one sub-block (``step`` rows per loop iteration)."""
    diag = jnp.diagonal(us)

    def body(g, carry):
        ws, ks, es = carry
        r0 = g * step
        if nm is not None:  # choose the mask of rows r0 .. r0+m-1 on the current weights
            grp = lax.dynamic_slice_in_dim(ws, r0, step, 0)
            dg = lax.dynamic_slice_in_dim(diag, r0, step, 0)
            keep = _nm_keep(jnp.square(grp) / jnp.square(dg)[:, None], nm[0])
            ks = lax.dynamic_update_slice_in_dim(ks, keep, r0, 0)
        for t in range(step):
            r = r0 + t
            wr = lax.dynamic_index_in_dim(ws, r, 0, keepdims=False)
            kr = lax.dynamic_index_in_dim(ks, r, 0, keepdims=False)
            q = jnp.where(kr, wr, jnp.zeros((), wr.dtype))
            err = (wr - q) / diag[r]
            ur = lax.dynamic_index_in_dim(us, r, 0, keepdims=False)  # zero before column r
            ws = ws - ur[:, None] * err[None, :]
            ws = lax.dynamic_update_index_in_dim(ws, q, r, 0)
            es = lax.dynamic_update_index_in_dim(es, err, r, 0)
        return ws, ks, es

    return lax.fori_loop(0, ws.shape[0] // step, body, (ws, ks, es))


def _lazy(w, u, keep, chunk, solve):
    """The rows of ``w`` in chunks of ``chunk`` rows: ``solve(j, w_j, u_j, keep_j) -> (w_j, keep_j,
    err_j)`` solves chunk ``j``, then its errors update every later row of ``w`` at once (the
    lazy batch update of GPTQ/SparseGPT). Returns ``(w, keep, err)``."""
    size = w.shape[0]
    cols = jnp.arange(size)

    def body(j, carry):
        w, keep, err = carry
        r0 = j * chunk
        wc = lax.dynamic_slice_in_dim(w, r0, chunk, 0)
        kc = lax.dynamic_slice_in_dim(keep, r0, chunk, 0)
        uc = lax.dynamic_slice(u, (r0, r0), (chunk, chunk))
        wc, kc, ec = solve(j, wc, uc, kc)
        w = lax.dynamic_update_slice_in_dim(w, wc, r0, 0)
        keep = lax.dynamic_update_slice_in_dim(keep, kc, r0, 0)
        err = lax.dynamic_update_slice_in_dim(err, ec, r0, 0)
        later = lax.dynamic_slice_in_dim(u, r0, chunk, 0)
        later = jnp.where(cols[None, :] >= r0 + chunk, later, jnp.zeros((), later.dtype))
        w = w - jnp.matmul(later.T, ec, precision=_HI)
        return w, keep, err

    return lax.fori_loop(0, size // chunk, body, (w, keep, jnp.zeros_like(w)))


def _block(wb, ub, kb, *, sub, step, nm):
    """One block: sub-blocks of ``sub`` rows, each followed by a lazy update of the block."""

    def solve(_, ws, us, ks):
        return _rows(ws, us, ks, jnp.zeros_like(ws), step=step, nm=nm)

    return _lazy(wb, ub, kb, sub, solve)


def _sub_sizes(blocksize: int, nm: tuple[int, int] | None) -> tuple[int, int]:
    """(rows per sub-block, rows per loop iteration)."""
    step = nm[1] if nm is not None else math.gcd(blocksize, 4)
    sub = blocksize
    for cand in range(step, blocksize + 1, step):
        if cand >= _SUB and blocksize % cand == 0:
            sub = cand
            break
    return sub, step


def _block_mask(wb, ub, count, forced, real):
    """Unstructured mask of one block: ``count`` smallest saliencies pruned (``forced`` first)."""
    keys = _int_keys(jnp.square(wb) / jnp.square(jnp.diagonal(ub))[:, None])
    _, top, _ = _key_bounds(keys)
    keys = jnp.where(real[:, None], keys, jnp.asarray(top, keys.dtype))
    keys = jnp.where(forced, jnp.asarray(-1, keys.dtype), keys)
    return ~prune_smallest(keys.reshape(1, -1), count).reshape(wb.shape)


def _superblock(w, u, counts, forced, b0, *, rows, blocksize, nm):
    """The blocks of one superblock (``w``, ``u``, ``forced``: its rows; ``b0``: first block).

    A ``fori_loop`` over blocks; each block's lazy update reaches the superblock's later rows.
    """
    sub, step = _sub_sizes(blocksize, nm)

    def solve(j, wb, ub, kb):
        if nm is None:
            i1 = j * blocksize
            real = (b0 * blocksize + i1 + jnp.arange(blocksize)) < rows
            fb = lax.dynamic_slice_in_dim(forced, i1, blocksize, 0)
            kb = _block_mask(wb, ub, counts[b0 + j], fb, real)
        return _block(wb, ub, kb, sub=sub, step=step, nm=nm)

    return _lazy(w, u, jnp.ones(w.shape, bool), blocksize, solve)


@functools.partial(jax.jit, static_argnames=("rows", "blocksize", "nm"))
def _sweep(w, u, counts, forced, *, rows, blocksize, nm):
    """The SparseGPT sweep over a padded kernel ``w`` (``rows`` real rows); see the module doc.

    ``counts[b]``: entries pruned in block ``b`` (unstructured); ``forced``: entries pruned
    before any other (unstructured; the previous level of a progressive database). Blocks are
    grouped in superblocks of ``_SUPER`` blocks: a Python loop over superblocks (static slices,
    so the lazy updates between superblocks cost exactly their size) around a ``fori_loop``
    over the blocks of each, which keeps the program small.
    """
    d, _ = w.shape
    step = blocksize * _SUPER
    keeps = []
    for s1 in range(0, d, step):
        s2 = min(s1 + step, d)
        ws, ks, es = _superblock(
            w[s1:s2],
            u[s1:s2, s1:s2],
            counts,
            forced[s1:s2],
            s1 // blocksize,
            rows=rows,
            blocksize=blocksize,
            nm=nm,
        )
        w = w.at[s1:s2].set(ws)
        if s2 < d:
            w = w.at[s2:].add(-jnp.matmul(u[s1:s2, s2:].T, es, precision=_HI))
        keeps.append(ks)
    return w[:rows], jnp.concatenate(keeps)[:rows]


def block_counts(rows: int, cols: int, blocksize: int, sparsity: float) -> np.ndarray:
    """Entries pruned per block: ``B d_out - ceil(B d_out (1 - s))`` (last block: its rows)."""
    out = []
    for i1 in range(0, rows, blocksize):
        size = (min(i1 + blocksize, rows) - i1) * cols
        out.append(size - keep_count(size, sparsity))
    return np.asarray(out, np.int32)


def _as_2d(kernel: Any, hessian: Any, fn: str, name: str) -> tuple[jax.Array, jax.Array]:
    w = jnp.asarray(kernel)
    h = jnp.asarray(hessian)
    if w.ndim != 2 or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(
            f"{fn}: {name}: kernel must be a floating (d_in, d_out) array, got "
            f"{w.dtype}{tuple(w.shape)}"
        )
    if h.shape != (w.shape[0], w.shape[0]) or not jnp.issubdtype(h.dtype, jnp.floating):
        raise ValueError(
            f"{fn}: {name}: hessian must be a floating ({w.shape[0]}, {w.shape[0]}) array for a "
            f"kernel of shape {tuple(w.shape)}, got {h.dtype}{tuple(h.shape)}"
        )
    return w, h


def _not_pd(name: str, percdamp: float) -> NotPositiveDefiniteError:
    return NotPositiveDefiniteError(
        f"layer {name!r}: the Hessian is not positive definite after dampening with "
        f"percdamp={percdamp} (Cholesky failed; non-finite calibration inputs also cause "
        f"this); use a larger percdamp, e.g. percdamp={min(1.0, percdamp * 10):g}"
    )


def solve_layer(w, h, *, sparsity, nm, blocksize, percdamp, name):
    """SparseGPT on one 2-D kernel, in ``h``'s float dtype; raises if ``H`` is not PD."""
    dtype = jnp.promote_types(h.dtype, jnp.float32)
    w32, h32 = w.astype(dtype), h.astype(dtype)
    wp, u, ok = _factor(w32, h32, jnp.asarray(percdamp, dtype), blocksize=blocksize)
    if not bool(ok):
        raise _not_pd(name, percdamp)
    rows, cols = w.shape
    if nm is None:
        counts = jnp.asarray(block_counts(rows, cols, blocksize, sparsity))
    else:
        counts = jnp.zeros((wp.shape[0] // blocksize,), jnp.int32)
    forced = jnp.zeros(wp.shape, bool)
    wn, keep = _sweep(wp, u, counts, forced, rows=rows, blocksize=blocksize, nm=nm)
    return wn.astype(w.dtype), keep


def sparsegpt_layer(
    kernel: Any,
    hessian: Any,
    *,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[jax.Array, jax.Array]:
    """SparseGPT on one Dense kernel: mask and OBS reconstruction (module docstring).

    Args:
      kernel: ``(d_in, d_out)`` (Flax layout, ``y = x @ kernel``).
      hessian: ``(d_in, d_in)``, ``2 X^T X / n`` of the layer's calibration inputs (any
        positive multiple gives the same result). Computed in ``hessian``'s float dtype
        (float32 at least; float64 under ``jax.enable_x64``).
      sparsity: unstructured: fraction pruned in every block of ``blocksize`` rows, in [0, 1).
      n, m: N:M instead: keep ``n`` of every ``m`` consecutive inputs (``d_in % m == 0``).
      blocksize: rows per lazy-update block (reference 128); a multiple of ``m`` for N:M.
      percdamp: dampening ``percdamp * mean(diag H)`` added to the diagonal (> 0).

    Returns:
      ``(kernel, mask)``: the reconstructed kernel (``kernel``'s dtype, zero where pruned) and
      the bool mask (True = kept).

    Raises:
      ValueError: bad arguments (before any work); :class:`NotPositiveDefiniteError` when the
        dampened Hessian has no Cholesky factor.
    """
    sparsity, nm = check_criterion(sparsity, n, m, "sparsegpt_layer")
    blocksize, percdamp = check_solver_args(blocksize, percdamp, nm, "sparsegpt_layer")
    w, h = _as_2d(kernel, hessian, "sparsegpt_layer", "kernel")
    if nm is not None and w.shape[0] % nm[1]:
        raise ValueError(
            f"sparsegpt_layer: kernel has d_in={w.shape[0]} inputs, not divisible by m={nm[1]}"
        )
    return solve_layer(
        w, h, sparsity=sparsity, nm=nm, blocksize=blocksize, percdamp=percdamp, name="kernel"
    )


@jax.jit
def _hessian_error(h, w_dense, w):
    dw = (w - w_dense).astype(h.dtype)
    wd = w_dense.astype(h.dtype)
    num = jnp.sum(dw * jnp.matmul(h, dw, precision=_HI))
    den = jnp.sum(wd * jnp.matmul(h, wd, precision=_HI))
    return num / jnp.maximum(den, jnp.finfo(h.dtype).tiny)


def hessian_error(hessian: Any, w_dense: Any, w: Any) -> float:
    """``||X (W - W_d)||^2 / ||X W_d||^2`` from ``H ∝ X^T X``: ``tr(dW^T H dW) / tr(W_d^T H W_d)``.

    Kernels are 2-D ``(d_in, d_out)`` (or any shape whose leading axes flatten to ``d_in``).
    """
    h = jnp.asarray(hessian)
    wd = jnp.asarray(w_dense).reshape(h.shape[0], -1)
    return float(_hessian_error(h, wd, jnp.asarray(w).reshape(wd.shape)))


# --------------------------------------------------------------------------------------
# The OBS database.
# --------------------------------------------------------------------------------------


def _parse_option(opt: Any, layer: str) -> tuple[str, Any]:
    """``("sparsity", s)`` or ``("nm", (n, m))`` from a float, an ``(n, m)`` pair or ``"n:m"``."""
    if isinstance(opt, str):
        parts = opt.split(":")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            opt = (int(parts[0]), int(parts[1]))
        else:
            raise ValueError(f"layer {layer!r}: option {opt!r} is not a sparsity or 'n:m'")
    if isinstance(opt, tuple):
        if len(opt) != 2 or not all(_is_int(v) for v in opt) or not 0 < opt[0] < opt[1]:
            raise ValueError(f"layer {layer!r}: N:M option must be (n, m), 0 < n < m; got {opt!r}")
        return "nm", (int(opt[0]), int(opt[1]))
    if isinstance(opt, bool) or not isinstance(opt, numbers.Real) or not 0 <= float(opt) < 1:
        raise ValueError(
            f"layer {layer!r}: option {opt!r} must be a sparsity in [0, 1), (n, m) or 'n:m'"
        )
    return "sparsity", float(opt)


def _default_label(opt: Any) -> str:
    if isinstance(opt, tuple):
        return f"{opt[0]}:{opt[1]}"
    if isinstance(opt, str):
        return opt
    return f"{float(opt):.4f}"


def _magnitude(w2: np.ndarray, kind: str, value: Any) -> np.ndarray:
    """Magnitude mask of a 2-D kernel: per layer (sparsity) or N:M along d_in."""
    a = np.abs(w2.astype(np.float64))
    if kind == "nm":
        n, m = value
        g = a.T.reshape(a.shape[1], -1, m)
        order = np.argsort(-g, axis=-1, kind="stable")
        keep = np.zeros(g.shape, bool)
        np.put_along_axis(keep, order[..., :n], True, axis=-1)
        return keep.reshape(a.shape[1], -1).T
    k = keep_count(a.size, value)
    order = np.argsort(-a.ravel(), kind="stable")
    keep = np.zeros(a.size, bool)
    keep[order[:k]] = True
    return keep.reshape(a.shape)


def obs_database(
    params: Any,
    hessians: Mapping[str, Any],
    options: Sequence[Any] | Mapping[str, Sequence[Any]],
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    label_fn: Callable[[Any], str] | None = None,
    progress: bool = False,
) -> Database:
    """SPDY's database with OBS (SparseGPT) reconstruction: every option from one factorisation.

    For each layer (in ``hessians`` order), the Hessian is dampened and factorised once; the
    sparsity options are then pruned progressively (each level continues from the previous
    level's reconstructed kernel, its pruned entries forced out, so masks are nested) and each
    N:M option is one sweep from the dense kernel (module docstring). Errors are the normalised
    layer output errors ``||X dW||^2 / ||X W||^2`` computed from the Hessian (``errors``: the
    reconstructed kernel; ``raw_errors``: plain magnitude pruning at the same option).

    Args:
      params: the dense params pytree (``nnx.State``, dict, ...).
      hessians: ``name -> (d_in, d_in)`` Hessian (``2 X^T X / n`` of the dense model's layer
        inputs, e.g. from :func:`jaxcompress.prune.hessians`); ``name`` is the kernel leaf's
        :func:`jaxcompress.masks.path_str`. A kernel with more than two axes (``nnx.LinearGeneral``)
        is flattened to ``(d_in, d_out)`` where its leading axes multiply to ``d_in``.
      options: shared by all layers or ``name -> options``, option 0 dense (``0.0``); each a
        sparsity in [0, 1) (increasing among themselves), an ``(n, m)`` pair, or ``"n:m"``.
      blocksize, percdamp: as :func:`sparsegpt_layer`.
      label_fn: option -> label; default ``f"{s:.4f}"`` for sparsities and ``"n:m"`` for N:M
        (the labels :meth:`jaxcompress.spdy.TimingTable.from_flops` gives with the same options
        written as floats and ``"n:m"`` strings).
      progress: print one line per layer.

    Returns:
      A :class:`jaxcompress.spdy.Database` (host arrays; ``stitch`` and :func:`stitcher` apply it).
    """
    fn = "obs_database"
    if not isinstance(hessians, Mapping) or not hessians:
        raise ValueError(f"{fn}: hessians must be a non-empty mapping name -> (d_in, d_in) array")
    blocksize, percdamp = check_solver_args(blocksize, percdamp, None, fn)
    label_fn = label_fn or _default_label
    names = tuple(hessians)
    leaves = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    missing = [nm for nm in names if nm not in leaves]
    if missing:
        raise ValueError(f"{fn}: params has no leaves named {missing}")
    plans = []
    for name in names:  # validate everything before any work
        opts = options[name] if isinstance(options, Mapping) else options
        if isinstance(opts, str | bytes) or len(opts) == 0:
            raise ValueError(f"{fn}: layer {name!r} needs a non-empty sequence of options")
        parsed = [_parse_option(o, name) for o in opts]
        if parsed[0] != ("sparsity", 0.0):
            raise ValueError(f"{fn}: layer {name!r}: option 0 must be 0.0 (dense), got {opts[0]!r}")
        levels = [v for k, v in parsed if k == "sparsity"]
        if any(b <= a for a, b in zip(levels, levels[1:], strict=False)):
            raise ValueError(f"{fn}: layer {name!r}: sparsity options must increase, got {levels}")
        w = leaves[name]
        h = jnp.asarray(hessians[name])
        d_in = h.shape[0] if h.ndim == 2 else -1
        if h.ndim != 2 or h.shape[1] != d_in or not _flattens(w.shape, d_in):
            raise ValueError(
                f"{fn}: layer {name!r}: hessian of shape {tuple(h.shape)} does not fit a kernel of "
                f"shape {tuple(w.shape)} (expected (d_in, d_in) with the kernel's leading axes "
                "multiplying to d_in)"
            )
        for kind, value in parsed:
            if kind == "nm" and (d_in % value[1] or blocksize % value[1]):
                raise ValueError(
                    f"{fn}: layer {name!r}: N:M option {value} needs d_in={d_in} and "
                    f"blocksize={blocksize} divisible by m={value[1]}"
                )
        plans.append((name, opts, parsed, h))

    entries = Entries("obs_database", "magnitude", progress)
    for name, opts, parsed, h in plans:
        w = leaves[name]
        shape, dtype = w.shape, w.dtype
        w2 = jnp.asarray(w).reshape(h.shape[0], -1)
        cdt = jnp.promote_types(h.dtype, jnp.float32)
        hc = h.astype(cdt)
        wp, u, ok = _factor(w2.astype(cdt), hc, jnp.asarray(percdamp, cdt), blocksize=blocksize)
        if not bool(ok):
            raise _not_pd(name, percdamp)
        rows, cols = w2.shape
        nblocks = wp.shape[0] // blocksize
        ks, ms, es, rs = [], [], [], []
        prev_w, prev_keep = wp, jnp.ones(wp.shape, bool)
        for kind, value in parsed:
            if kind == "sparsity" and value == 0.0:
                k_w, k_m = w2, jnp.ones(w2.shape, bool)
            elif kind == "sparsity":
                counts = jnp.asarray(block_counts(rows, cols, blocksize, value))
                k_w, k_m = _sweep(
                    prev_w, u, counts, ~prev_keep, rows=rows, blocksize=blocksize, nm=None
                )
                prev_w = jnp.pad(k_w, ((0, wp.shape[0] - rows), (0, 0)))
                prev_keep = jnp.pad(k_m, ((0, wp.shape[0] - rows), (0, 0)), constant_values=True)
            else:
                zeros = jnp.zeros((nblocks,), jnp.int32)
                k_w, k_m = _sweep(
                    wp,
                    u,
                    zeros,
                    jnp.zeros(wp.shape, bool),
                    rows=rows,
                    blocksize=blocksize,
                    nm=value,
                )
            k_w = k_w.astype(dtype)
            es.append(float(_hessian_error(hc, w2, k_w)))
            raw = np.where(_magnitude(np.asarray(w2), kind, value), np.asarray(w2), 0)
            rs.append(float(_hessian_error(hc, w2, jnp.asarray(raw))))
            ks.append(np.asarray(k_w).reshape(shape))
            ms.append(np.asarray(k_m).reshape(shape))
        entries.add(name, tuple(label_fn(o) for o in opts), ks, ms, es, rs)
    return entries.database(names)


def _flattens(shape: tuple[int, ...], d_in: int) -> bool:
    prod = 1
    for i, s in enumerate(shape[:-1]):
        prod *= s
        if prod == d_in:
            return i + 1 < len(shape)
    return False


@jax.tree_util.register_pytree_node_class
class Stitcher:
    """Stitches a :class:`Database` into params on the device: ``stitcher(params, choice)``.

    Built by :func:`stitcher`. A pytree (its leaves are the stacked options), so it can be an
    argument of a jitted function: ``choice`` (``int[L]``, ``database.names`` order) may be
    traced, and one compiled calibration loss then scores every profile of
    :func:`jaxcompress.spdy.search`.
    """

    def __init__(self, names: tuple[str, ...], stacks: Mapping[str, tuple[Any, Any]]):
        self.names = tuple(names)
        self.stacks = dict(stacks)

    def tree_flatten(self):
        return tuple(self.stacks[n] for n in self.names), self.names

    @classmethod
    def tree_unflatten(cls, names, children):
        return cls(names, dict(zip(names, children, strict=True)))

    def __call__(self, params: Any, choice: Any) -> tuple[Any, Any]:
        """``(params, masks)``: each database layer's chosen option; other leaves unchanged."""
        index = {name: i for i, name in enumerate(self.names)}
        choice = jnp.asarray(choice, jnp.int32).reshape(len(self.names))
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        new, masks, found = [], [], set()
        for path, leaf in flat:
            name = path_str(path)
            if name in index:
                kern, mask = self.stacks[name]
                if tuple(kern.shape[1:]) != tuple(leaf.shape):
                    raise ValueError(
                        f"stitcher: layer {name!r}: database shape {kern.shape[1:]} != "
                        f"{tuple(leaf.shape)}"
                    )
                j = choice[index[name]]
                new.append(lax.dynamic_index_in_dim(kern, j, 0, keepdims=False))
                masks.append(lax.dynamic_index_in_dim(mask, j, 0, keepdims=False))
                found.add(name)
            else:
                new.append(leaf)
                masks.append(None)
        missing = sorted(set(self.names) - found)
        if missing:
            raise ValueError(f"stitcher: params has no leaves named {missing}")
        return treedef.unflatten(new), treedef.unflatten(masks)


def stitcher(database: Database, params: Any) -> Stitcher:
    """Put the options of ``database`` on the device once, for stitching profiles in a jit.

    Every layer's options become a stacked ``(n_options, *shape)`` array in the kernel's dtype
    (with the kernel's sharding on the trailing axes when it has a ``NamedSharding``), and its
    masks a bool stack. ``stitcher(database, params)(params, choice)`` equals
    ``database.stitch(params, choice)``.

    Example (the calibration loss of a stitched NNX model, compiled once)::

        st = jc.spdy.stitcher(db, params)

        @jax.jit
        def loss(st, params, choice, x, y):
            p, _ = st(params, choice)
            return cross_entropy(nnx.merge(graphdef, p, rest)(x), y)

        score_fn = lambda choice: float(loss(st, params, choice, x, y))
    """
    if not isinstance(database, Database):
        raise TypeError(f"stitcher: database must be a jaxcompress.spdy.Database, got {database!r}")
    leaves = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    missing = [n for n in database.names if n not in leaves]
    if missing:
        raise ValueError(f"stitcher: params has no leaves named {missing}")

    def put(stack: np.ndarray, leaf: Any, dtype: Any) -> jax.Array:
        arr = jnp.asarray(stack, dtype=dtype)
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            spec = jax.sharding.PartitionSpec(None, *sharding.spec)
            return jax.device_put(arr, jax.sharding.NamedSharding(sharding.mesh, spec))
        return arr

    stacks = {}
    for name in database.names:
        leaf = leaves[name]
        kern = database.kernels[name]
        if tuple(kern.shape[1:]) != tuple(leaf.shape):
            raise ValueError(
                f"stitcher: layer {name!r}: database shape {kern.shape[1:]} != {leaf.shape}"
            )
        stacks[name] = (put(kern, leaf, leaf.dtype), put(database.masks[name], leaf, jnp.bool_))
    return Stitcher(database.names, stacks)
