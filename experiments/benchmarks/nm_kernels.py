"""Benchmark: N:M (2:4) Pallas matmul vs dense ``jnp.dot``, plus mask/pack throughput.

On a GPU (one command)::

    python experiments/benchmarks/nm_kernels.py --out out/nm_kernels

runs batch sizes 1..4096 x weights 4096x4096, 4096x11008, 11008x4096, 8192x8192 in bf16 and
fp16, dense vs ``nm_matmul(implementation='pallas')``: median time of the same run after
warm-up, compulsory bytes moved and achieved bandwidth, a correctness check against dense,
and mask/pack throughput. It writes ``results.csv``, ``results.json``, ``speedup.png`` and
``nm_policy.json`` (the measured dispatch table for this GPU: merge its ``devices`` entry into
``jaxcompress/kernels/nm_policy.json`` or point ``$JAXCOMPRESS_NM_POLICY`` at it).
``--sweep`` also searches tile configs per point (batches up to ``--sweep-max-batch``) and
keeps the fastest; every trial goes to ``sweep.json``.

On CPU there is no Pallas backend: the script times the reference path (unpack +
``jnp.dot``) on small shapes and says so (``"platform": "cpu"`` and a ``note`` in the JSON).
That run only proves the pipeline works; it is not a kernel measurement.

Timing: ``--calls`` calls are issued inside one jitted function so Python dispatch does not
dominate microsecond kernels, and every call reads its own ``x`` and its own copy of the
weight: no weight is in L2 when it is read (16 copies of the smallest weight are 512 MiB,
ten times the H100's L2), as in decoding, and XLA cannot merge dense dots that share an
operand into one GEMM (its ``dot_merger`` pass does that, which made an earlier version of
this benchmark report dense bandwidths above HBM's). Mask and pack are timed the same way.
The reported time is the median over ``--reps`` repetitions divided by the number of calls.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import platform as _platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from _timing import write_json

from jaxcompress.kernels import MetaLayout, NMMatmulConfig, nm_mask, nm_matmul, pack_nm

GPU_BATCHES = (1, 4, 16, 64, 256, 1024, 4096)
GPU_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192))
GPU_DTYPES = ("bfloat16", "float16")
CPU_BATCHES = (1, 4, 16, 64)
CPU_SHAPES = ((256, 256), (512, 1024))
CPU_DTYPES = ("float32", "bfloat16")
CPU_NOTE = (
    "CPU: no Pallas backend, so 'sparse' is the reference path (unpack + jnp.dot) on small "
    "shapes. This run checks the pipeline; it is not a measurement of the GPU kernel."
)


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="out/nm_kernels", help="output folder")
    p.add_argument("--quick", action="store_true", help="few shapes/batches, fewer reps")
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--m", type=int, default=4)
    p.add_argument("--dtypes", nargs="*", help="override dtypes (e.g. bfloat16 float16)")
    p.add_argument("--batches", nargs="*", type=int, help="override batch sizes")
    p.add_argument("--shapes", nargs="*", help="override weight shapes as KxN (e.g. 4096x4096)")
    p.add_argument("--reps", type=int, default=None, help="timing repetitions (median)")
    p.add_argument("--calls", type=int, default=None, help="calls per timed jitted function")
    p.add_argument(
        "--sweep",
        action="store_true",
        help="GPU: coordinate search over tile configs per point (about 25 compiles each)",
    )
    p.add_argument(
        "--sweep-max-batch", type=int, default=64, help="sweep only batches up to this size"
    )
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def _timed(fn, args, reps):
    """Median seconds of ``fn(*args)`` (already compiled by a warm-up)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _many(op):
    """jit of ``[op(xs[i], ws[i]) for i]`` in one executable: one launch sequence, no Python
    dispatch between calls, and no operand shared between calls."""

    def run(xs, ws):
        return [op(x, w) for x, w in zip(xs, ws, strict=True)]

    return jax.jit(run)


def _many1(op):
    """jit of ``[op(w) for w in ws]`` in one executable (mask/pack throughput)."""
    return jax.jit(lambda ws: [op(w) for w in ws])


def _dense_op(x, w):
    """The baseline: plain ``jnp.dot`` (cuBLAS on GPU, float32 accumulation internally)."""
    return jnp.dot(x, w)


def _dense_f32(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _sweep(time_config, base, k, cols, layout):
    """Coordinate search over tile configs from ``base``; returns ``(seconds, config, trials)``.

    Stage 1 crosses ``block_k`` (rows per phase 16/32/64) with ``split_k`` (1..16); stage 2
    crosses ``block_n`` with ``num_warps`` around the best; stage 3 tries ``num_stages``.
    Configs that do not fit the shape are skipped; ones that fail to compile are reported.
    """
    pd = layout.period_dense
    trials = {}

    def consider(cfg):
        if cfg in trials:
            return
        try:
            cfg.check(k, cols, layout, min_dot=16)
        except ValueError:
            return
        try:
            trials[cfg] = time_config(cfg)
        except Exception as e:  # a config that fails to compile or run is skipped
            print(f"  config {cfg} failed: {type(e).__name__}: {str(e)[:200]}")
            trials[cfg] = math.inf

    def best():
        return min(trials, key=trials.get)

    consider(base)
    for rows in (16, 32, 64):
        for split_k in (1, 2, 4, 8, 16):
            consider(dataclasses.replace(base, block_k=rows * pd, split_k=split_k))
    top = best()
    for block_n in (32, 64, 128, 256):
        for warps in (2, 4, 8):
            consider(dataclasses.replace(top, block_n=block_n, num_warps=warps))
    top = best()
    for stages in (2, 3, 4, 5):
        consider(dataclasses.replace(top, num_stages=stages))
    top = best()
    return trials[top], top, [{"config": str(c), "us": t * 1e6} for c, t in trials.items()]


def _policy_entries(rows, n, m):
    """max_batch per (dtype, K, N): the largest batch up to which every measured batch has
    speedup >= 1 (0 if the kernel already loses at the smallest batch)."""
    entries = []
    keys = sorted({(r["dtype"], r["k"], r["n"]) for r in rows})
    for dtype, k, cols in keys:
        pts = sorted(
            (r["batch"], r["speedup"])
            for r in rows
            if (r["dtype"], r["k"], r["n"]) == (dtype, k, cols)
        )
        max_batch = 0
        for batch, speedup in pts:
            if speedup < 1.0:
                break
            max_batch = batch
        entries.append(
            {"k": k, "n": cols, "dtype": dtype, "nm": f"{n}:{m}", "max_batch": max_batch}
        )
    return entries


def _plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        for k, cols in sorted({(r["k"], r["n"]) for r in rows if r["dtype"] == dtype}):
            pts = sorted(
                (r["batch"], r["speedup"])
                for r in rows
                if r["dtype"] == dtype and (r["k"], r["n"]) == (k, cols)
            )
            ax.plot([b for b, _ in pts], [s for _, s in pts], marker="o", label=f"{k}x{cols}")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (rows of x)")
        ax.set_ylabel("speedup over dense (x)")
        ax.set_title(f"{title} {dtype}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    on_gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
    impl = "pallas" if on_gpu else "xla"
    n, m = args.n, args.m
    layout = MetaLayout(n, m)
    if on_gpu:
        shapes = GPU_SHAPES[:2] if args.quick else GPU_SHAPES
        batches = (1, 16, 256) if args.quick else GPU_BATCHES
        dtypes = GPU_DTYPES[:1] if args.quick else GPU_DTYPES
    else:
        shapes = CPU_SHAPES[:1] if args.quick else CPU_SHAPES
        batches = (1, 16) if args.quick else CPU_BATCHES
        dtypes = CPU_DTYPES[:1] if args.quick else CPU_DTYPES
    if args.shapes:
        shapes = tuple(tuple(int(v) for v in s.lower().split("x")) for s in args.shapes)
    batches = tuple(args.batches) if args.batches else batches
    dtypes = tuple(args.dtypes) if args.dtypes else dtypes
    reps = args.reps or (5 if args.quick else 20)
    calls = args.calls or (4 if not on_gpu else 16)
    device = jax.devices()[0]
    os.makedirs(args.out, exist_ok=True)
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"sparse path: implementation={impl!r}, {n}:{m}")
    if not on_gpu:
        print("NOTE: " + CPU_NOTE)

    rows, mask_pack, sweeps = [], [], []
    key = jax.random.key(0)
    for dtype_name in dtypes:
        dtype = jnp.dtype(dtype_name)
        size = dtype.itemsize
        for k, cols in shapes:
            key, kw, kx = jax.random.split(key, 3)
            w = jax.random.normal(kw, (k, cols), jnp.float32).astype(dtype)
            # mask / pack throughput (dense bytes read per second), one weight copy per call
            ws = [jnp.array(w, copy=True) for _ in range(calls)]
            mask_fn = _many1(lambda w: nm_mask(w, n, m, implementation=impl))
            t_mask = _timed(mask_fn, (ws,), reps) / calls
            ws_dense = [
                jnp.where(mk, wc, 0).astype(dtype) for mk, wc in zip(mask_fn(ws), ws, strict=True)
            ]
            del ws
            pack_fn = _many1(lambda w: pack_nm(w, n, m, implementation=impl))
            t_pack = _timed(pack_fn, (ws_dense,), reps) / calls
            mask_pack.append(
                {
                    "dtype": dtype_name,
                    "k": k,
                    "n": cols,
                    "mask_us": t_mask * 1e6,
                    "mask_GBps": k * cols * size / t_mask / 1e9,
                    "pack_us": t_pack * 1e6,
                    "pack_GBps": k * cols * size / t_pack / 1e9,
                }
            )
            ws_packed = [pack_nm(wd, n, m) for wd in ws_dense]
            packed_bytes = ws_packed[0].nbytes
            for batch in batches:
                xs = list(jax.random.normal(kx, (calls, batch, k), jnp.float32).astype(dtype))
                t_dense = _timed(_many(_dense_op), (xs, ws_dense), reps) / calls

                def time_config(cfg, xs=xs, ws_packed=ws_packed):
                    op = lambda x, p: nm_matmul(x, p, implementation=impl, config=cfg)
                    return _timed(_many(op), (xs, ws_packed), reps) / calls

                base = (
                    NMMatmulConfig.default(batch, k, cols, layout, itemsize=size)
                    if on_gpu
                    else None
                )
                if on_gpu and args.sweep and batch <= args.sweep_max_batch:
                    t_sparse, cfg, trials = _sweep(time_config, base, k, cols, layout)
                    sweeps.append(
                        {
                            "dtype": dtype_name,
                            "k": k,
                            "n": cols,
                            "batch": batch,
                            "default": str(base),
                            "default_us": trials[0]["us"],
                            "best": str(cfg),
                            "best_us": t_sparse * 1e6,
                            "trials": trials,
                        }
                    )
                    print(
                        f"  sweep: default {trials[0]['us']:.1f} us -> best "
                        f"{t_sparse * 1e6:.1f} us {cfg}"
                    )
                else:
                    t_sparse, cfg = time_config(base), base
                y = nm_matmul(xs[0], ws_packed[0], implementation=impl, config=cfg)
                y_ref = _dense_f32(xs[0], ws_dense[0])
                err = float(
                    jnp.max(jnp.abs(y.astype(jnp.float32) - y_ref))
                    / (jnp.max(jnp.abs(y_ref)) + 1e-30)
                )
                io = batch * k * size + batch * cols * size
                dense_bytes = k * cols * size + io
                sparse_bytes = packed_bytes + io
                row = {
                    "device": device.device_kind,
                    "platform": jax.default_backend(),
                    "implementation": impl,
                    "dtype": dtype_name,
                    "k": k,
                    "n": cols,
                    "batch": batch,
                    "dense_us": t_dense * 1e6,
                    "sparse_us": t_sparse * 1e6,
                    "speedup": t_dense / t_sparse,
                    "dense_bytes": dense_bytes,
                    "sparse_bytes": sparse_bytes,
                    "dense_GBps": dense_bytes / t_dense / 1e9,
                    "sparse_GBps": sparse_bytes / t_sparse / 1e9,
                    "byte_ratio": dense_bytes / sparse_bytes,
                    "max_rel_err": err,
                    "config": "" if cfg is None else str(cfg),
                }
                rows.append(row)
                print(
                    f"{dtype_name:8s} {k:5d}x{cols:<5d} batch {batch:5d}: dense "
                    f"{row['dense_us']:9.1f} us ({row['dense_GBps']:7.1f} GB/s)  sparse "
                    f"{row['sparse_us']:9.1f} us ({row['sparse_GBps']:7.1f} GB/s)  speedup "
                    f"{row['speedup']:5.2f}x (bytes {row['byte_ratio']:.2f}x)  err {err:.1e}"
                )
            print(
                f"{dtype_name:8s} {k:5d}x{cols:<5d} mask {mask_pack[-1]['mask_GBps']:.2f} GB/s, "
                f"pack {mask_pack[-1]['pack_GBps']:.2f} GB/s"
            )

    result = {
        "platform": jax.default_backend(),
        "device_kind": device.device_kind,
        "jax_version": jax.__version__,
        "python": _platform.python_version(),
        "implementation": impl,
        "pattern": f"{n}:{m}",
        "reps": reps,
        "calls_per_timing": calls,
        "time_unit": "microseconds per call, median over reps",
        "bytes": "compulsory bytes: weight (dense, or values+meta) + x + y",
        "results": rows,
        "mask_pack": mask_pack,
    }
    if not on_gpu:
        result["note"] = CPU_NOTE
    else:
        policy = {
            "format": 1,
            "devices": {
                device.device_kind: {
                    "mode": "table",
                    "entries": _policy_entries(rows, n, m),
                    "source": f"experiments/benchmarks/nm_kernels.py, jax {jax.__version__}",
                }
            },
        }
        result["policy"] = policy
        write_json(os.path.join(args.out, "nm_policy.json"), policy, indent=2)
    if sweeps:
        write_json(os.path.join(args.out, "sweep.json"), sweeps, indent=2)
    write_json(os.path.join(args.out, "results.json"), result, indent=2)
    with open(os.path.join(args.out, "results.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if not args.no_plot:
        title = "N:M matmul" if on_gpu else "CPU reference (not a kernel)"
        _plot(rows, os.path.join(args.out, "speedup.png"), title)
    print(f"wrote {args.out}/results.csv, results.json" + ("" if args.no_plot else ", speedup.png"))
    return result


if __name__ == "__main__":
    main()
