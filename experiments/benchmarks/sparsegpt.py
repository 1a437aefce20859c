"""Time per layer of jitted SparseGPT against a NumPy restatement, and against Wanda and magnitude.

For each ``d`` in ``--dims`` (``d_in = d_out = d``) one random layer: inputs ``X`` (``2d x d``,
correlated), ``H = 2 X^T X / n``, a Gaussian kernel. Timed per layer, given the Hessian (the
calibration forward passes are not part of the solve):

* ``sparsegpt``: :func:`jaxcompress.prune.sparsegpt_layer` (jitted factorisation and sweep,
  compiled and warmed up first), unstructured ``--sparsity`` and 2:4;
* ``numpy``: the same algorithm written in NumPy/SciPy (below, float32 like the jitted one):
  the same dampening, the same factorisation route to ``U`` (Cholesky of the reversed Hessian
  and a triangular inverse), a Python loop over the rows of each block doing the reference's
  vectorised row update, the block's mask by ``argpartition`` (unstructured) or per group of m
  rows (N:M), and the lazy update after every block as one BLAS matmul;
* ``wanda``: :func:`jaxcompress.prune.wanda_layer` given the input norms (jitted);
* ``magnitude``: :func:`jaxcompress.prune.oneshot` on the kernel (``scope="layer"``; N:M).

Each variant is timed ``--repeats`` times (interleaved); reported are the median wall and
process-CPU seconds, the ratios ``numpy / sparsegpt`` (target: at least 10x at d = 2048), and
peak memory: the XLA temporary buffers of the compiled SparseGPT programs
(``memory_analysis``) and the peak of NumPy's allocations (``tracemalloc``). The two results
are checked to agree (same masks but for float32 near-ties; reconstruction errors within 1%).
The factorisation (``factor``) and the sweep given ``U`` (``sweep``) are also timed on their own:
both sides factorise with the same LAPACK routines, so the whole-layer ratio is bounded by the
factorisation's share; the sweep is where jitting the row loop pays.

Usage::

    python experiments/benchmarks/sparsegpt.py \
        --out experiments/benchmarks/results/sparsegpt/cpu.json
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
from scipy.linalg import solve_triangular

import jaxcompress as jc
from jaxcompress.spdy import _obs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import report  # noqa: E402


def numpy_factor(w, h, percdamp=0.01):
    """Dead inputs, dampening and ``U`` (upper, ``H^-1 = U^T U``), as the jitted solver."""
    w = np.array(w)
    h = np.array(h)
    d = w.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[dead, :] = 0
    h[np.diag_indices(d)] += percdamp * np.mean(np.diag(h))
    low = np.linalg.cholesky(h[::-1, ::-1])
    u = np.triu(solve_triangular(low, np.eye(d, dtype=h.dtype), lower=True)[::-1, ::-1])
    return w, u


def numpy_sweep(w, u, *, sparsity=None, n=None, m=None, blocksize=128):
    """The SparseGPT sweep over the rows of ``w`` (``d_in, d_out``) given ``U``."""
    w = np.array(w)
    d = w.shape[0]
    mask = np.ones(w.shape, bool)
    for i1 in range(0, d, blocksize):
        i2 = min(i1 + blocksize, d)
        w1, u1 = w[i1:i2].copy(), u[i1:i2, i1:i2]
        diag = np.diag(u1)
        err1 = np.zeros_like(w1)
        keep = np.ones(w1.shape, bool)
        if sparsity is not None:
            sal = (w1**2 / diag[:, None] ** 2).ravel()
            k = sal.size - math.ceil(sal.size * (1 - sparsity) - sal.size * 2.0**-40)
            if k:
                flat = np.ones(sal.size, bool)
                flat[np.argpartition(sal, k - 1)[:k]] = False
                keep = flat.reshape(w1.shape)
        for i in range(i2 - i1):
            if n is not None and i % m == 0:
                sal = w1[i : i + m] ** 2 / diag[i : i + m, None] ** 2
                grp = np.zeros(sal.shape, bool)
                np.put_along_axis(grp, np.argsort(-sal, axis=0, kind="stable")[:n], True, 0)
                keep[i : i + m] = grp
            q = w1[i] * keep[i]
            err = (w1[i] - q) / diag[i]
            w1[i:] -= np.outer(u1[i, i:], err)
            w1[i], err1[i] = q, err
        w[i1:i2], mask[i1:i2] = w1, keep
        w[i2:] -= u[i1:i2, i2:].T @ err1
    return w, mask


def numpy_sparsegpt(w, h, *, sparsity=None, n=None, m=None, blocksize=128, percdamp=0.01):
    """SparseGPT in NumPy/SciPy, Flax layout ``w (d_in, d_out)``, in ``w``'s dtype."""
    w, u = numpy_factor(w, h, percdamp)
    return numpy_sweep(w, u, sparsity=sparsity, n=n, m=m, blocksize=blocksize)


def _time(fn, clock_pairs):
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    jax.block_until_ready(out)
    clock_pairs.append((time.perf_counter() - start, time.process_time() - cpu))
    return out


def _xla_temp_bytes(w, h, crit, blocksize):
    nm = (crit["n"], crit["m"]) if "n" in crit else None
    pd = jnp.float32(0.01)
    f = _obs._factor.lower(w, h, pd, blocksize=blocksize).compile()
    wp, u, _ = _obs._factor(w, h, pd, blocksize=blocksize)
    counts = jnp.zeros((wp.shape[0] // blocksize,), jnp.int32)
    forced = jnp.zeros(wp.shape, bool)
    s = _obs._sweep.lower(
        wp, u, counts, forced, rows=w.shape[0], blocksize=blocksize, nm=nm
    ).compile()
    return max(f.memory_analysis().temp_size_in_bytes, s.memory_analysis().temp_size_in_bytes)


def bench_dim(d: int, args) -> dict:
    rng = np.random.default_rng(args.seed + d)
    x = rng.standard_normal((2 * d, d)).astype(np.float32)
    x = x @ (np.eye(d, dtype=np.float32) + rng.standard_normal((d, d)).astype(np.float32) / d**0.25)
    h_np = (2.0 * x.T @ x / x.shape[0]).astype(np.float32)
    w_np = rng.standard_normal((d, d)).astype(np.float32)
    norms = jnp.asarray(np.sqrt((x.astype(np.float64) ** 2).sum(axis=0)), jnp.float32)
    w, h = jnp.asarray(w_np), jnp.asarray(h_np)
    crits = {"unstructured": {"sparsity": args.sparsity}, "2:4": {"n": 2, "m": 4}}
    bs = args.blocksize
    pd = jnp.float32(0.01)
    wp, u, _ = _obs._factor(w, h, pd, blocksize=bs)
    w_f, u_f = numpy_factor(w_np, h_np)
    forced = jnp.zeros(wp.shape, bool)
    counts = jnp.asarray(_obs.block_counts(d, d, bs, args.sparsity))
    variants = {
        "factor jax": lambda: _obs._factor(w, h, pd, blocksize=bs),
        "factor numpy": lambda: numpy_factor(w_np, h_np),
    }
    for label, crit in crits.items():
        nm = (crit["n"], crit["m"]) if "n" in crit else None
        variants[f"sweep jax {label}"] = lambda nm=nm: _obs._sweep(
            wp, u, counts, forced, rows=d, blocksize=bs, nm=nm
        )
        variants[f"sweep numpy {label}"] = lambda c=crit: numpy_sweep(w_f, u_f, blocksize=bs, **c)
    for label, crit in crits.items():
        variants[f"sparsegpt {label}"] = lambda c=crit: jc.prune.sparsegpt_layer(
            w, h, blocksize=bs, **c
        )
        variants[f"numpy {label}"] = lambda c=crit: numpy_sparsegpt(w_np, h_np, blocksize=bs, **c)
        variants[f"wanda {label}"] = lambda c=crit: jc.prune.wanda_layer(w, norms, **c)
        scope = {"scope": "layer"} if "sparsity" in crit else {}
        magnitude = jax.jit(lambda w, c=crit, s=scope: jc.prune.oneshot({"kernel": w}, **c, **s))
        variants[f"magnitude {label}"] = lambda f=magnitude: f(w)
    outs = {name: fn() for name, fn in variants.items()}  # compile and warm up
    times = {name: [] for name in variants}
    repeats = args.repeats if d < 2048 else max(3, args.repeats // 2)
    for _ in range(repeats):
        for name, fn in variants.items():
            _time(fn, times[name])
    row = {"d": d, "repeats": repeats}
    for name, ts in times.items():
        row[name] = {
            "wall_s": statistics.median(t for t, _ in ts),
            "cpu_s": statistics.median(c for _, c in ts),
        }
    for label, crit in crits.items():
        jw, jm = (np.asarray(a) for a in outs[f"sparsegpt {label}"])
        nw, nmask = outs[f"numpy {label}"]
        err = lambda v: float(np.linalg.norm(x @ (v.astype(np.float64) - w_np)))  # noqa: E731
        row[f"check {label}"] = {
            "mask_agreement": float(np.mean(jm == nmask)),
            "error_jax": err(jw),
            "error_numpy": err(nw),
            "error_masking_only": err(w_np * jm),
        }
        sg, npy = row[f"sparsegpt {label}"], row[f"numpy {label}"]
        row[f"ratio numpy/sparsegpt {label}"] = {
            "wall": npy["wall_s"] / sg["wall_s"],
            "cpu": npy["cpu_s"] / sg["cpu_s"],
        }
        sj, sn = row[f"sweep jax {label}"], row[f"sweep numpy {label}"]
        row[f"ratio numpy/jax sweep only {label}"] = {
            "wall": sn["wall_s"] / sj["wall_s"],
            "cpu": sn["cpu_s"] / sj["cpu_s"],
        }
        tracemalloc.start()
        numpy_sparsegpt(w_np, h_np, blocksize=bs, **crit)
        row[f"numpy {label}"]["peak_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        row[f"sparsegpt {label}"]["xla_temp_bytes"] = _xla_temp_bytes(w, h, crit, bs)
    return row


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON file for the results")
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--blocksize", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if any(d < 4 or d % 4 for d in args.dims):
        parser.error(f"--dims must be positive multiples of 4, got {args.dims}")
    if not 0.0 <= args.sparsity < 1.0:
        parser.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.blocksize < 4 or args.blocksize % 4:
        parser.error(f"--blocksize must be a positive multiple of 4, got {args.blocksize}")
    if args.repeats < 3:
        parser.error(f"--repeats must be >= 3, got {args.repeats}")
    return args


def main(argv=None) -> dict:
    args = _parse(argv)
    rows = {}
    for d in args.dims:
        rows[f"d={d}"] = bench_dim(d, args)
        print(f"d={d} done", flush=True)
    summary = {
        name: {
            label: {
                "whole layer": rows[name][f"ratio numpy/sparsegpt {label}"],
                "sweep only": rows[name][f"ratio numpy/jax sweep only {label}"],
            }
            for label in ("unstructured", "2:4")
        }
        for name in rows
    }
    last = rows[f"d={max(args.dims)}"]
    summary["target_10x_at_largest_d_cpu_clock"] = all(
        last[f"ratio numpy/sparsegpt {label}"]["cpu"] >= 10 for label in ("unstructured", "2:4")
    )

    def line(name, row):
        parts = [name]
        for key, t in row.items():
            if isinstance(t, dict) and "wall_s" in t:
                wall, cpu = t["wall_s"] * 1e3, t["cpu_s"] * 1e3
                parts.append(f"{key}: {wall:.1f} ms wall, {cpu:.1f} ms cpu")
        return "\n  ".join(parts)

    return report("sparsegpt", args, rows, summary, line)


if __name__ == "__main__":
    main()
