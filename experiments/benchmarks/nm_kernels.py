"""Benchmark (issue #22): 2:4 ``nm_matmul`` (Mosaic GPU kernel) vs dense ``jnp.dot``.

On an H100/H200, one command (``experiments/benchmarks/gpu_checks.sh`` runs it)::

    python experiments/benchmarks/nm_kernels.py --out out/nm_kernels [--sweep]

runs, in this order and in one process:

a. the baseline: the device-to-device copy bandwidth (``x + 1`` and ``jnp.copy`` of a 1 GiB
   array, bytes read + written), then dense ``jnp.dot`` of ``x`` ``(B, K)`` bf16 by ``W``
   ``(K, N)`` for ``K x N`` in 4096x14336, 14336x4096, 8192x8192, 8192x28672 and ``B`` in
   1, 2, 4, 8, 16, 64, with the achieved bandwidth (compulsory bytes ``W + x + y`` / time);
b. the fused XLA ``nm_mask`` and ``pack_nm`` on the same weights (bytes read + written per
   second, and as a fraction of the copy bandwidth: target >= 0.7);
c. ``nm_matmul(implementation='mosaic')`` with the default ``NMMatmulConfig`` on every point:
   time, achieved bandwidth (``packed.nbytes + x + y``), speedup over (a), and the output
   checked against the dense product (relative error of the norm <= 1e-2). Dense is timed
   once more right after each sparse point (``dense_recheck_us``); the policy and the
   targets use the faster of the two dense times (``speedup_conservative``);
d. end to end: an NNX MLP stack (``--e2e-depth`` residual blocks 4096 -> 14336 -> 4096,
   bf16), masked 2:4 with ``nm_mask`` and converted with ``sparsify_for_inference``: time of
   a decode step at batch 1 and 16 of the masked dense model, of the converted model with
   ``implementation='mosaic'`` and of the converted model with the dispatcher reading the
   policy just measured; outputs compared with the dense model's;
e. with ``--sweep`` (after (d), so ``--budget-s`` cuts it first): a coordinate search over
   ``expand``, ``split_k``, then ``block_n`` and ``max_concurrent_steps`` at the batches of
   ``--sweep-batches``. A config that fails to compile or run is recorded, not fatal.

It writes into ``--out``: ``results.json`` (machine, versions, every row in measurement
order with its start time ``t_s``, failures, targets; rewritten after every stage, so a run
cut short keeps what it measured), ``results.csv`` (one row per shape and batch),
``speedup.png`` (speedup vs batch per shape, with y = 1 and y = 1.3) and ``nm_policy.json``:
the dispatch table of this device kind, ``max_batch`` per shape = the largest measured batch
up to which every measured batch ran correctly with ``sparse <= 1.05 x dense`` (merge its
``devices`` entry into ``jaxcompress/kernels/nm_policy.json`` or point
``$JAXCOMPRESS_NM_POLICY`` at it).

Timing: each timed function is one ``jit`` that makes ``--calls`` calls (8 on a GPU, at
least 4), each with its own ``x`` and its own copy of the weight, so no call finds its weight
in L2 (every GPU weight is also larger than an H100's 50 MB L2) and XLA cannot merge dots
that share an operand. The time of a call is the median over ``--reps`` runs divided by the
calls. Weight copies are bounded by ``--mem-gib``.

Without an sm90 GPU (CPU) the same pipeline runs end to end on small shapes in well under a
minute: the sparse path is ``implementation='xla'`` (unpack + ``jnp.dot``) and the JSON says
so in ``note``; a tiny ``implementation='interpret'`` check of the kernel runs too. That run
checks the pipeline; it measures no kernel.

``python experiments/benchmarks/nm_kernels.py --replot OUT`` draws ``OUT/speedup.png`` again
from ``OUT/results.json`` (for a run on a device image without matplotlib). The exit status
is 1 when a measured stage failed, a sparse point is wrong or the converted model disagrees.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform as _platform
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
from _results import machine_info, package_versions, write_json

from jaxcompress.kernels import NMMatmulConfig, nm_mask, nm_matmul, pack_nm
from jaxcompress.kernels._common import is_hopper

GPU_SHAPES = ((4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672))
GPU_BATCHES = (1, 2, 4, 8, 16, 64)
CPU_SHAPES = ((512, 256), (1024, 512))
CPU_BATCHES = (1, 4, 16)
RTOL = 1e-2
"""Output agreement: ``|y - y_ref| / |y_ref|`` (Frobenius norms) at most this."""
SLOWDOWN = 1.05
"""The dispatcher may pick the kernel where it is at most this much slower than dense."""
TARGET_SPEEDUP = 1.3
TARGET_COPY_FRACTION = 0.7
CPU_NOTE = (
    "no sm90 GPU: the Mosaic GPU kernel needs an H100/H200, so the 'sparse' rows are "
    "nm_matmul(implementation='xla') (unpack + jnp.dot) on small shapes and the end-to-end "
    "model uses that path too. This run checks the pipeline; it is not a kernel measurement."
)
SECTIONS = ("copy", "dense_baseline", "mask_pack", "sparse", "e2e", "sweep")


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="out/nm_kernels", help="output folder")
    p.add_argument("--quick", action="store_true", help="fewer shapes, batches and reps")
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--m", type=int, default=4)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16"], help="bfloat16 and/or float16")
    p.add_argument("--batches", nargs="+", type=int, help="override the batch sizes")
    p.add_argument("--shapes", nargs="+", help="override the weight shapes, KxN (8192x8192)")
    p.add_argument("--reps", type=int, help="timed runs per measurement (median)")
    p.add_argument("--calls", type=int, help="calls per timed jitted function (>= 1)")
    p.add_argument("--mem-gib", type=float, default=12.0, help="bound on the weight copies")
    p.add_argument("--copy-mib", type=int, help="size of the copy-bandwidth array")
    p.add_argument("--no-recheck", action="store_true", help="no dense timing after sparse")
    p.add_argument("--sweep", action="store_true", help="GPU: search kernel configs")
    p.add_argument("--sweep-batches", nargs="+", type=int, default=[1, 16])
    p.add_argument(
        "--budget-s",
        type=float,
        default=300.0,
        help="seconds after which the sweep stops (the rest always runs)",
    )
    p.add_argument("--e2e-width", type=int, help="MLP width (GPU 4096)")
    p.add_argument("--e2e-hidden", type=int, help="MLP hidden width (GPU 14336)")
    p.add_argument("--e2e-depth", type=int, help="residual MLP blocks (GPU 4)")
    p.add_argument("--e2e-batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--no-e2e", action="store_true")
    p.add_argument(
        "--interpret-check",
        choices=("auto", "on", "off"),
        default="auto",
        help="tiny implementation='interpret' check of the kernel (auto: without a GPU)",
    )
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    for name in ("reps", "calls", "copy_mib", "e2e_width", "e2e_hidden", "e2e_depth"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for dtype in args.dtypes:
        if dtype not in ("bfloat16", "float16", "float32"):
            p.error(f"--dtypes: expected bfloat16, float16 or float32, got {dtype!r}")
    return args


def _shape(text: str) -> tuple[int, int]:
    try:
        k, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: expected KxN such as 8192x8192, got {text!r}") from None
    return k, cols


class _Run:
    """Clock, rows and failures of one run; ``save()`` rewrites results.json."""

    def __init__(self, args, header: dict):
        self.args, self.header = args, header
        self.start = time.perf_counter()
        self.sections: list[dict] = []
        self.data: dict = {name: [] for name in SECTIONS if name != "copy"}
        self.data["copy"] = {}
        self.failures: list[dict] = []
        self.extra: dict = {}

    def now(self) -> float:
        return round(time.perf_counter() - self.start, 3)

    def begin(self, name: str) -> None:
        self.sections.append({"section": name, "start_s": self.now(), "end_s": None})
        print(f"== {name} (t = {self.now():.1f} s)", flush=True)

    def end(self) -> None:
        self.sections[-1]["end_s"] = self.now()
        self.save(complete=False)

    def fail(self, stage: str, error: BaseException, **where) -> dict:
        record = {
            "stage": stage,
            **where,
            "t_s": self.now(),
            "error": f"{type(error).__name__}: {str(error)[:2000]}",
            "traceback_tail": traceback.format_exc(limit=-4)[-3000:],
        }
        self.failures.append(record)
        short = str(error).splitlines()[0][:300] if str(error) else ""
        print(f"  FAILED {stage} {where}: {type(error).__name__}: {short}", flush=True)
        return record

    def result(self, complete: bool) -> dict:
        return {
            **self.header,
            "complete": complete,
            "elapsed_s": self.now(),
            "sections": self.sections,
            **self.data,
            "failures": self.failures,
            **self.extra,
        }

    def save(self, complete: bool) -> dict:
        result = self.result(complete)
        write_json(os.path.join(self.args.out, "results.json"), result, indent=2)
        return result


def _timed(fn, args, reps: int) -> float:
    """Median seconds of ``fn(*args)`` after two untimed calls (compile + warm-up)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _many(op):
    """jit of ``[op(xs[i], ws[i]) for i]``: one executable, no operand shared by two calls."""
    return jax.jit(lambda xs, ws: [op(x, w) for x, w in zip(xs, ws, strict=True)])


_DENSE_MANY = _many(jnp.dot)
"""The dense timed function (one jit object, so a repeated shape is not compiled again)."""


def _many1(op):
    """jit of ``[op(w) for w in ws]`` (mask / pack throughput)."""
    return jax.jit(lambda ws: [op(w) for w in ws])


def _copies(a, count: int) -> list:
    """``count`` distinct device buffers holding ``a`` (a pytree)."""
    return [a] + [jax.tree.map(lambda v: jnp.array(v, copy=True), a) for _ in range(count - 1)]


def _rel_err(y, y_ref) -> float:
    y_ref = y_ref.astype(jnp.float32)
    diff = jnp.linalg.norm(y.astype(jnp.float32) - y_ref)
    return float(diff / (jnp.linalg.norm(y_ref) + 1e-30))


def _weight(k: int, cols: int, dtype, seed: int):
    key = jax.random.fold_in(jax.random.key(0), seed)
    return jax.random.normal(key, (k, cols), jnp.float32).astype(dtype)


def _calls_for(args, weight_bytes: int, default: int) -> int:
    """Calls per timed function: ``--calls`` (default ``default``), lowered so that dense and
    packed copies (~1.6x the dense bytes each) fit ``--mem-gib``, but at least 4."""
    calls = args.calls or default
    fit = int(args.mem_gib * 2**30 // max(1, int(1.6 * weight_bytes)))
    return max(min(calls, 4), min(calls, fit))


def _copy_bandwidth(run: _Run, mib: int, reps: int) -> dict:
    """Device-to-device bandwidth (bytes read + written per second) of ``x + 1`` and
    ``jnp.copy(x)`` on a ``mib`` MiB bf16 array; the larger is the reference."""
    x = jnp.ones((mib * 2**20 // 2,), jnp.bfloat16)
    nbytes = 2 * x.size * x.dtype.itemsize
    out = {"array_bytes": int(x.size * x.dtype.itemsize), "bytes_moved": int(nbytes)}
    for name, fn in (
        ("add_one", jax.jit(lambda a: a + jnp.ones((), a.dtype))),
        ("copy", jax.jit(lambda a: jnp.copy(a))),
    ):
        t = _timed(fn, (x,), reps)
        out[f"{name}_us"] = t * 1e6
        out[f"{name}_GBps"] = nbytes / t / 1e9
    # the larger of the two, unless jnp.copy is implausibly faster than x + 1 (a copy that
    # XLA elided or aliased would make every fraction of it meaningless)
    plausible = out["copy_GBps"] <= 1.5 * out["add_one_GBps"]
    out["copy_plausible"] = plausible
    out["GBps"] = max(out["add_one_GBps"], out["copy_GBps"] if plausible else 0.0)
    out["t_s"] = run.now()
    print(
        f"copy bandwidth: x+1 {out['add_one_GBps']:.1f} GB/s, jnp.copy {out['copy_GBps']:.1f} "
        f"GB/s (read + write of {out['array_bytes'] / 2**20:.0f} MiB)",
        flush=True,
    )
    return out


def _dense_baseline(run: _Run, grid, batches, reps: int, default_calls: int) -> dict:
    rows = {}
    for dtype_name, k, cols in grid:
        dtype = jnp.dtype(dtype_name)
        size = dtype.itemsize
        calls = _calls_for(run.args, k * cols * size, default_calls)
        ws = _copies(_weight(k, cols, dtype, k * 7 + cols), calls)
        for batch in batches:
            t_s = run.now()
            xs = list(jax.random.normal(jax.random.key(batch), (calls, batch, k)).astype(dtype))
            try:
                t = _timed(_DENSE_MANY, (xs, ws), reps) / calls
            except Exception as e:  # e.g. out of memory: recorded, the run goes on
                run.fail("dense_baseline", e, dtype=dtype_name, k=k, n=cols, batch=batch)
                continue
            nbytes = (k * cols + batch * k + batch * cols) * size
            row = {
                "dtype": dtype_name,
                "k": k,
                "n": cols,
                "batch": batch,
                "calls": calls,
                "dense_us": t * 1e6,
                "dense_bytes": nbytes,
                "dense_GBps": nbytes / t / 1e9,
                "t_s": t_s,
            }
            rows[(dtype_name, k, cols, batch)] = row
            run.data["dense_baseline"].append(row)
            print(
                f"dense {dtype_name} {k}x{cols} batch {batch:3d}: {t * 1e6:9.1f} us "
                f"{row['dense_GBps']:8.1f} GB/s (calls {calls})",
                flush=True,
            )
        del ws
    return rows


def _mask_pack(run: _Run, grid, reps: int, default_calls: int, copy_gbps: float, n: int, m: int):
    for dtype_name, k, cols in grid:
        dtype = jnp.dtype(dtype_name)
        size = dtype.itemsize
        calls = _calls_for(run.args, k * cols * size, default_calls)
        row = {"dtype": dtype_name, "k": k, "n": cols, "calls": calls, "t_s": run.now()}
        try:
            ws = _copies(_weight(k, cols, dtype, k * 7 + cols), calls)
            t_mask = _timed(_many1(lambda w: nm_mask(w, n, m)), (ws,), reps) / calls
            dense = [jnp.where(nm_mask(w, n, m), w, 0).astype(dtype) for w in ws]
            del ws
            t_pack = _timed(_many1(lambda w: pack_nm(w, n, m)), (dense,), reps) / calls
            packed_bytes = pack_nm(dense[0], n, m).nbytes
            del dense
        except Exception as e:
            run.fail("mask_pack", e, dtype=dtype_name, k=k, n=cols)
            continue
        read = k * cols * size
        for name, t, written in (("mask", t_mask, k * cols), ("pack", t_pack, packed_bytes)):
            moved = read + written
            row[f"{name}_us"] = t * 1e6
            row[f"{name}_bytes"] = moved
            row[f"{name}_GBps"] = moved / t / 1e9
            row[f"{name}_read_GBps"] = read / t / 1e9
            row[f"{name}_copy_fraction"] = moved / t / 1e9 / copy_gbps
        run.data["mask_pack"].append(row)
        print(
            f"mask {dtype_name} {k}x{cols}: {row['mask_GBps']:.1f} GB/s "
            f"({row['mask_copy_fraction']:.2f} of copy); pack {row['pack_GBps']:.1f} GB/s "
            f"({row['pack_copy_fraction']:.2f} of copy)",
            flush=True,
        )


def _sparse_inputs(k, cols, dtype, calls, n, m):
    """Masked dense copies and packed copies of the benchmark weight of ``(k, cols)``."""
    w = _weight(k, cols, dtype, k * 7 + cols)
    dense = jnp.where(nm_mask(w, n, m), w, 0).astype(dtype)
    del w
    packed = pack_nm(dense, n, m)
    return _copies(dense, calls), _copies(packed, calls)


def _sparse(run: _Run, grid, batches, reps, default_calls, baseline, impl, n, m) -> list[dict]:
    args = run.args
    rows = []
    for dtype_name, k, cols in grid:
        dtype = jnp.dtype(dtype_name)
        size = dtype.itemsize
        calls = _calls_for(args, k * cols * size, default_calls)
        try:
            ws, ps = _sparse_inputs(k, cols, dtype, calls, n, m)
        except Exception as e:
            run.fail("sparse_setup", e, dtype=dtype_name, k=k, n=cols)
            continue
        layout, stride, packed_bytes = ps[0].layout, ps[0].stride, ps[0].nbytes
        for batch in batches:
            base = baseline.get((dtype_name, k, cols, batch))
            xs = list(jax.random.normal(jax.random.key(batch), (calls, batch, k)).astype(dtype))
            io = (batch * k + batch * cols) * size
            row = {
                "device": run.header["device_kind"],
                "platform": run.header["platform"],
                "implementation": impl,
                "dtype": dtype_name,
                "k": k,
                "n": cols,
                "batch": batch,
                "calls": calls,
                "dense_us": None if base is None else base["dense_us"],
                "dense_GBps": None if base is None else base["dense_GBps"],
                "dense_t_s": None if base is None else base["t_s"],
                "sparse_us": None,
                "sparse_GBps": None,
                "sparse_t_s": run.now(),
                "dense_recheck_us": None,
                "speedup": None,
                "speedup_conservative": None,
                "dense_bytes": k * cols * size + io,
                "sparse_bytes": packed_bytes + io,
                "byte_ratio": (k * cols * size + io) / (packed_bytes + io),
                "rel_err": None,
                "dense_rel_err": None,
                "status": "failed",
                "config": "",
                "error": "",
            }
            cfg = None
            try:
                if impl != "xla":
                    cfg = NMMatmulConfig.default(batch, k, cols, layout)
                    row["config"] = str(cfg)
                    cfg.check(batch, k, cols, layout, stride)
                op = lambda x, p, cfg=cfg: nm_matmul(x, p, implementation=impl, config=cfg)
                fn = _many(op)
                t = _timed(fn, (xs, ps), reps) / calls
                y = fn(xs, ps)[0]  # the timed executable's own output, no second compile
            except Exception as e:  # a kernel that fails to compile or run is a result
                rec = run.fail("sparse", e, dtype=dtype_name, k=k, n=cols, batch=batch)
                row["error"] = rec["error"][:300]
                rows.append(row)
                run.data["sparse"].append(row)
                continue
            y_ref = jnp.dot(xs[0], ws[0], preferred_element_type=jnp.float32)
            row["rel_err"] = _rel_err(y, y_ref)
            row["dense_rel_err"] = _rel_err(jnp.dot(xs[0], ws[0]), y_ref)
            row["sparse_us"] = t * 1e6
            row["sparse_GBps"] = row["sparse_bytes"] / t / 1e9
            row["status"] = "ok" if row["rel_err"] <= RTOL else "wrong"
            dense_times = [] if base is None else [base["dense_us"]]
            if not args.no_recheck:
                try:
                    t_d = _timed(_DENSE_MANY, (xs, ws), reps) / calls
                    row["dense_recheck_us"] = t_d * 1e6
                    dense_times.append(t_d * 1e6)
                except Exception as e:
                    run.fail("dense_recheck", e, dtype=dtype_name, k=k, n=cols, batch=batch)
            if base is not None:
                row["speedup"] = base["dense_us"] / row["sparse_us"]
            if dense_times:
                row["speedup_conservative"] = min(dense_times) / row["sparse_us"]
            rows.append(row)
            run.data["sparse"].append(row)
            print(
                f"sparse {dtype_name} {k}x{cols} batch {batch:3d}: {row['sparse_us']:9.1f} us "
                f"{row['sparse_GBps']:8.1f} GB/s  speedup {_fmt(row['speedup'])}x "
                f"(conservative {_fmt(row['speedup_conservative'])}x, bytes "
                f"{row['byte_ratio']:.2f}x)  rel err {row['rel_err']:.1e} {row['status']}",
                flush=True,
            )
        del ws, ps
    return rows


def _fmt(v, spec: str = "5.2f") -> str:
    return "  n/a" if v is None else format(v, spec)


def _sweep_candidates(base: NMMatmulConfig, stage: int, top: NMMatmulConfig) -> list:
    out = []
    if stage == 1:
        for expand in ("registers", "smem"):
            for split_k in (1, 2, 4, 8, 16):
                out.append(dict(expand=expand, split_k=split_k))
        return [(base, o) for o in out]
    for block_n in (64, 128):
        for steps in (2, 3, 4, 6):
            out.append(dict(block_n=block_n, max_concurrent_steps=steps))
    return [(top, o) for o in out]


def _sweep_point(run: _Run, impl, reps, calls, xs, ps, y_ref, point: dict) -> None:
    """The coordinate search of one point (``point``: dtype, k, n, batch), into ``point``."""
    batch, k, cols = point["batch"], point["k"], point["n"]
    layout, stride = ps[0].layout, ps[0].stride
    base = NMMatmulConfig.default(batch, k, cols, layout)
    point.update(default=str(base), trials=[], stopped_by_budget=False)
    trials: dict[NMMatmulConfig, dict] = {}

    def consider(cfg):
        if cfg in trials:
            return
        if run.now() > run.args.budget_s:
            point["stopped_by_budget"] = True
            return
        trial = {"config": str(cfg), "us": None, "rel_err": None, "status": "failed"}
        trials[cfg] = trial
        try:
            cfg.check(batch, k, cols, layout, stride)
        except ValueError as e:
            trial.update(status="does not fit", error=str(e)[:300])
            return
        op = lambda x, p: nm_matmul(x, p, implementation=impl, config=cfg)
        try:
            fn = _many(op)
            trial["us"] = _timed(fn, (xs, ps), reps) / calls * 1e6
            trial["rel_err"] = _rel_err(fn(xs, ps)[0], y_ref)
            trial["status"] = "ok" if trial["rel_err"] <= RTOL else "wrong"
        except Exception as e:  # a config that fails to compile or run is a result
            rec = run.fail("sweep", e, k=k, n=cols, batch=batch, config=str(cfg))
            trial["error"] = rec["error"][:300]

    def best():
        ok = {c: t["us"] for c, t in trials.items() if t["status"] == "ok"}
        return min(ok, key=ok.get) if ok else None

    consider(base)
    for stage in (1, 2):
        for origin, change in _sweep_candidates(base, stage, best() or base):
            try:
                cfg = dataclasses.replace(origin, **change)
            except ValueError:  # not a valid config at all (e.g. block_n)
                continue
            consider(cfg)
    top = best()
    point["trials"] = list(trials.values())
    point["default_us"] = trials[base]["us"] if base in trials else None
    point["best"] = None if top is None else str(top)
    point["best_us"] = None if top is None else trials[top]["us"]


def _sweep(run: _Run, grid, reps, default_calls, impl, n, m) -> None:
    """Coordinate search per point: ``expand`` x ``split_k`` from the default, then
    ``block_n`` x ``max_concurrent_steps`` around the best; stops at ``--budget-s``."""
    args = run.args
    for dtype_name, k, cols in grid:
        dtype = jnp.dtype(dtype_name)
        calls = _calls_for(args, k * cols * dtype.itemsize, default_calls)
        if run.now() > args.budget_s:
            run.extra.setdefault("sweep_skipped", []).append(f"{dtype_name} {k}x{cols}")
            continue
        try:
            ws, ps = _sparse_inputs(k, cols, dtype, calls, n, m)
        except Exception as e:
            run.fail("sweep_setup", e, dtype=dtype_name, k=k, n=cols)
            continue
        for batch in args.sweep_batches:
            xs = list(jax.random.normal(jax.random.key(batch), (calls, batch, k)).astype(dtype))
            y_ref = jnp.dot(xs[0], ws[0], preferred_element_type=jnp.float32)
            point = {"dtype": dtype_name, "k": k, "n": cols, "batch": batch, "t_s": run.now()}
            try:
                _sweep_point(run, impl, reps, calls, xs, ps, y_ref, point)
            except Exception as e:  # e.g. no default config for this shape
                run.fail("sweep", e, dtype=dtype_name, k=k, n=cols, batch=batch)
                continue
            run.data["sweep"].append(point)
            print(
                f"sweep {k}x{cols} batch {batch}: default {point['default_us']} us -> best "
                f"{point['best_us']} us {point['best']} ({len(point['trials'])} configs)",
                flush=True,
            )
        del ws, ps


def _mlp_stack(width: int, hidden: int, depth: int, dtype, seed: int = 0):
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
            self.up = nnx.Linear(width, hidden, **kw)
            self.down = nnx.Linear(hidden, width, **kw)

        def __call__(self, x):
            return x + self.down(jax.nn.gelu(self.up(x)))

    class MLPStack(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([Block(rngs) for _ in range(depth)])

        def __call__(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    return MLPStack(nnx.Rngs(seed))


def _e2e(run: _Run, on_gpu: bool, impl: str, n: int, m: int, reps: int, policy_path: str):
    """Decode-step time and output agreement: masked dense MLP stack vs converted models."""
    from flax import nnx

    from jaxcompress.kernels import sparsify_for_inference
    from jaxcompress.kernels._dispatch import POLICY_ENV

    args = run.args
    width = args.e2e_width or (4096 if on_gpu else 256)
    hidden = args.e2e_hidden or (14336 if on_gpu else 512)
    depth = args.e2e_depth or (4 if on_gpu else 2)
    steps = 4 if on_gpu else 2
    dtype = jnp.bfloat16
    model = _mlp_stack(width, hidden, depth, dtype)
    for block in model.blocks:
        for layer in (block.up, block.down):
            k = layer.kernel[...]
            layer.kernel[...] = jnp.where(nm_mask(k, n, m), k, 0).astype(k.dtype)
    sparse, report = sparsify_for_inference(model, n=n, m=m, implementation=impl)
    models = {"dense_masked": model, f"sparse_{impl}": sparse}
    if on_gpu:
        models["sparse_dispatch"] = sparsify_for_inference(model, n=n, m=m)[0]
    info = {
        "width": width,
        "hidden": hidden,
        "depth": depth,
        "dtype": "bfloat16",
        "steps_per_timing": steps,
        "dense_weight_bytes": report.dense_bytes,
        "packed_weight_bytes": report.packed_bytes,
        "compression": report.compression,
        "policy": policy_path if on_gpu else None,
    }
    run.extra["e2e_model"] = info

    def decode(graphdef, state, x):
        # ``steps`` chained decode steps: the stack maps width -> width
        f = nnx.merge(graphdef, state)
        for _ in range(steps):
            x = f(x)
        return x

    saved = os.environ.get(POLICY_ENV)
    os.environ[POLICY_ENV] = os.path.abspath(policy_path)
    try:
        for batch in args.e2e_batches:
            x = jax.random.normal(jax.random.key(100 + batch), (batch, width)).astype(dtype)
            outs, times = {}, {}
            for name, mdl in models.items():
                graphdef, state = nnx.split(mdl)
                t_s = run.now()
                try:
                    one = jax.jit(lambda st, x, g=graphdef: nnx.merge(g, st)(x))
                    outs[name] = one(state, x)
                    fn = jax.jit(lambda st, x, g=graphdef: decode(g, st, x))
                    times[name] = _timed(fn, (state, x), reps) / steps
                except Exception as e:
                    run.fail("e2e", e, model=name, batch=batch)
                    continue
                row = {"model": name, "batch": batch, "t_s": t_s, "step_us": times[name] * 1e6}
                if name != "dense_masked" and "dense_masked" in outs:
                    row["rel_err"] = _rel_err(outs[name], outs["dense_masked"])
                    row["agrees"] = row["rel_err"] <= RTOL
                    if "dense_masked" in times:
                        row["speedup"] = times["dense_masked"] / times[name]
                run.data["e2e"].append(row)
                print(
                    f"e2e {name:16s} batch {batch:3d}: {row['step_us']:9.1f} us/step  "
                    f"speedup {_fmt(row.get('speedup'))}x  rel err "
                    f"{_fmt(row.get('rel_err'), '.1e')}",
                    flush=True,
                )
    finally:
        if saved is None:
            os.environ.pop(POLICY_ENV, None)
        else:
            os.environ[POLICY_ENV] = saved


def _interpret_check(run: _Run, n: int, m: int) -> None:
    """A tiny ``implementation='interpret'`` run of the kernel vs ``'xla'`` (on any machine)."""
    k, cols, batch = 512, 64, 2
    t0 = time.perf_counter()
    check = {"k": k, "n": cols, "batch": batch, "t_s": run.now(), "ok": False}
    try:
        w = _weight(k, cols, jnp.bfloat16, 1)
        p = pack_nm(jnp.where(nm_mask(w, n, m), w, 0).astype(w.dtype), n, m)
        x = jax.random.normal(jax.random.key(2), (batch, k)).astype(jnp.bfloat16)
        y = nm_matmul(x, p, implementation="interpret")
        check["rel_err"] = _rel_err(y, nm_matmul(x, p, implementation="xla"))
        check["ok"] = check["rel_err"] <= RTOL
    except Exception as e:
        check["error"] = run.fail("interpret", e, k=k, n=cols, batch=batch)["error"][:300]
    check["seconds"] = time.perf_counter() - t0
    run.extra["interpret_check"] = check
    print(f"interpret check: {check}", flush=True)


def _policy_entries(rows: list[dict], n: int, m: int) -> list[dict]:
    """``max_batch`` per (dtype, K, N): the largest measured batch up to which every measured
    batch ran correctly with ``sparse_us <= SLOWDOWN x`` the faster dense time (0: none).

    Entries are sorted by ``K*N`` and then ``max_batch``: the dispatcher takes the first of
    equally near entries (4096x14336 and 14336x4096 have the same ``K*N``), so a tie goes to
    the more conservative one.
    """
    entries = []
    for dtype, k, cols in sorted({(r["dtype"], r["k"], r["n"]) for r in rows}):
        same = [r for r in rows if (r["dtype"], r["k"], r["n"]) == (dtype, k, cols)]
        pts = sorted(same, key=lambda r: r["batch"])
        max_batch = 0
        for r in pts:
            s = r["speedup_conservative"]
            if r["status"] != "ok" or s is None or s < 1 / SLOWDOWN:
                break
            max_batch = r["batch"]
        entries.append(
            {"k": k, "n": cols, "dtype": dtype, "nm": f"{n}:{m}", "max_batch": max_batch}
        )
    return sorted(entries, key=lambda e: (e["dtype"], e["k"] * e["n"], e["max_batch"], e["k"]))


def _policy(run: _Run, rows, on_gpu: bool, n: int, m: int) -> dict:
    kind = run.header["device_kind"]
    source = (
        f"experiments/benchmarks/nm_kernels.py on {kind}, jax {jax.__version__}, "
        f"{time.strftime('%Y-%m-%d')}; max_batch: sparse <= {SLOWDOWN} x dense at every "
        "measured batch up to it, default NMMatmulConfig"
    )
    if on_gpu:
        rule = {"mode": "table", "entries": _policy_entries(rows, n, m), "source": source}
    else:
        rule = {"mode": "dense", "source": source + " (no sm90 GPU: always dense)"}
    return {"format": 1, "devices": {kind: rule}}


def _targets(run: _Run, rows, on_gpu: bool, copy_gbps: float) -> dict:
    out: dict = {}
    for batch in (1, 16):
        pts = [r for r in rows if r["batch"] == batch and r["status"] == "ok"]
        fast = sorted(
            f"{r['k']}x{r['n']}"
            for r in pts
            if (r["speedup_conservative"] or 0) >= TARGET_SPEEDUP and r["dtype"] == "bfloat16"
        )
        out[f"speedup_ge_{TARGET_SPEEDUP}_batch{batch}"] = fast
    shapes = len({(r["k"], r["n"]) for r in rows})
    out["speedup_met"] = on_gpu and all(
        len(out[f"speedup_ge_{TARGET_SPEEDUP}_batch{b}"]) >= min(3, shapes) for b in (1, 16)
    )
    fractions = [r[f"{op}_copy_fraction"] for r in run.data["mask_pack"] for op in ("mask", "pack")]
    out["copy_GBps"] = copy_gbps
    out["mask_pack_min_copy_fraction"] = min(fractions) if fractions else None
    out["mask_pack_met"] = bool(fractions) and min(fractions) >= TARGET_COPY_FRACTION
    e2e = [r for r in run.data["e2e"] if "rel_err" in r]
    out["e2e_agrees"] = bool(e2e) and all(r["agrees"] for r in e2e)
    out["e2e_speedup"] = {
        f"{r['model']}_batch{r['batch']}": r.get("speedup") for r in e2e if "speedup" in r
    }
    out["all_sparse_points_ok"] = bool(rows) and all(r["status"] == "ok" for r in rows)
    return out


def _plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 4.2), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        for k, cols in sorted({(r["k"], r["n"]) for r in rows if r["dtype"] == dtype}):
            pts = sorted(
                (r["batch"], r["speedup"])
                for r in rows
                if r["dtype"] == dtype and (r["k"], r["n"]) == (k, cols) and r["speedup"]
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{k}x{cols}")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--", label="dense (1x)")
        ax.axhline(TARGET_SPEEDUP, color="tab:red", lw=0.8, ls=":", label=f"{TARGET_SPEEDUP}x")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (rows of x)")
        ax.set_ylabel("speedup over dense jnp.dot (x)")
        ax.set_title(f"{title}, {dtype}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_csv(path: str, rows: list[dict]) -> None:
    fields = list(rows[0]) if rows else ["dtype", "k", "n", "batch"]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def main(argv=None) -> dict:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    n, m = args.n, args.m
    device = jax.devices()[0]
    on_gpu = is_hopper(device)
    impl = "mosaic" if on_gpu else "xla"
    if on_gpu:
        shapes = GPU_SHAPES[:2] if args.quick else GPU_SHAPES
        batches = (1, 16) if args.quick else GPU_BATCHES
    else:
        shapes = CPU_SHAPES[:1] if args.quick else CPU_SHAPES
        batches = (1, 16) if args.quick else CPU_BATCHES
    shapes = tuple(map(_shape, args.shapes)) if args.shapes else shapes
    batches = tuple(args.batches) if args.batches else batches
    reps = args.reps or (3 if not on_gpu else (5 if args.quick else 10))
    default_calls = 8 if on_gpu else 2
    copy_mib = args.copy_mib or (1024 if on_gpu else 32)
    grid = [(d, k, cols) for d in args.dtypes for k, cols in shapes]
    os.makedirs(args.out, exist_ok=True)
    for name in ("results.json", "results.csv", "speedup.png", "nm_policy.json"):
        if os.path.exists(os.path.join(args.out, name)):  # no stale output of an earlier run
            os.remove(os.path.join(args.out, name))
    header = {
        "benchmark": "nm_kernels",
        "format": 2,
        "platform": jax.default_backend(),
        "device_kind": device.device_kind,
        "device": str(device),
        "compute_capability": getattr(device, "compute_capability", None),
        "sm90": on_gpu,
        "machine": machine_info(),
        "versions": {
            "python": _platform.python_version(),
            **package_versions(("jax", "jaxlib", "flax", "numpy", "jax-cuda12-plugin")),
        },
        "implementation": impl,
        "pattern": f"{n}:{m}",
        "config": vars(args),
        "reps": reps,
        "time_unit": "microseconds per call, median over reps of one jit of `calls` calls",
        "bytes": "compulsory: weight (dense, or packed values + index words) + x + y; copy, "
        "mask and pack: bytes read + written",
        "rtol": RTOL,
    }
    if not on_gpu:
        header["note"] = CPU_NOTE
    run = _Run(args, header)
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(
        f"sparse path: nm_matmul(implementation={impl!r}), {n}:{m}; {len(grid)} shapes x "
        f"{len(batches)} batches, reps {reps}"
    )
    if not on_gpu:
        print("NOTE: " + CPU_NOTE)

    run.begin("copy")
    run.data["copy"] = _copy_bandwidth(run, copy_mib, reps)
    run.end()
    copy_gbps = run.data["copy"]["GBps"]
    run.begin("dense_baseline")
    baseline = _dense_baseline(run, grid, batches, reps, default_calls)
    run.end()
    run.begin("mask_pack")
    _mask_pack(run, grid, reps, default_calls, copy_gbps, n, m)
    run.end()
    run.begin("sparse")
    rows = _sparse(run, grid, batches, reps, default_calls, baseline, impl, n, m)
    run.end()
    if args.interpret_check == "on" or (args.interpret_check == "auto" and not on_gpu):
        _interpret_check(run, n, m)
    policy = _policy(run, rows, on_gpu, n, m)
    policy_path = os.path.join(args.out, "nm_policy.json")
    write_json(policy_path, policy, indent=2)
    run.extra["policy"] = policy
    if not args.no_e2e:
        run.begin("e2e")
        try:
            _e2e(run, on_gpu, impl, n, m, reps, policy_path)
        except Exception as e:  # model construction / conversion
            run.fail("e2e", e)
        run.end()
    if args.sweep:
        run.begin("sweep")
        if not on_gpu:
            run.extra["sweep_note"] = "the sweep needs the Mosaic GPU kernel (sm90); skipped"
        else:
            _sweep(run, grid, reps, default_calls, impl, n, m)
        run.end()
    run.extra["targets"] = _targets(run, rows, on_gpu, copy_gbps)
    _write_csv(os.path.join(args.out, "results.csv"), rows)
    if not args.no_plot and rows:
        try:
            kind = "Mosaic GPU" if on_gpu else "CPU, xla path (not a kernel)"
            title = f"2:4 nm_matmul, {device.device_kind} ({kind})"
            _plot(rows, os.path.join(args.out, "speedup.png"), title)
        except Exception as e:  # e.g. matplotlib missing on the device image
            run.fail("plot", e)
    result = run.save(complete=True)
    print("targets: " + str(run.extra["targets"]))
    figure = ", speedup.png" if os.path.exists(os.path.join(args.out, "speedup.png")) else ""
    print(
        f"{len(run.failures)} failures; wrote {args.out}: results.json, results.csv, "
        f"nm_policy.json{figure} in {run.now():.1f} s"
    )
    return result


FATAL_STAGES = ("dense_baseline", "mask_pack", "sparse", "sparse_setup", "e2e", "interpret")
"""Failures that make the script's exit status 1 (a failed sweep config or figure does not)."""


def exit_status(result: dict) -> int:
    """1 if a measured stage failed, a sparse point is wrong, or the converted model
    disagrees with the dense one; else 0."""
    problems = [f["stage"] for f in result["failures"] if f["stage"] in FATAL_STAGES]
    problems += [f"sparse {r['k']}x{r['n']} batch {r['batch']}: {r['status']}"
                 for r in result["sparse"] if r["status"] != "ok"]  # fmt: skip
    problems += [f"e2e {r['model']} batch {r['batch']} disagrees"
                 for r in result["e2e"] if r.get("agrees") is False]  # fmt: skip
    if problems:
        print("FAILED: " + "; ".join(sorted(set(problems))), file=sys.stderr)
    return 1 if problems else 0


def replot(folder: str) -> str:
    """Draw ``speedup.png`` again from ``folder/results.json`` (e.g. here, after a run on a
    device image without matplotlib); returns its path."""
    with open(os.path.join(folder, "results.json"), encoding="utf-8") as f:
        result = json.load(f)
    path = os.path.join(folder, "speedup.png")
    kind = "Mosaic GPU" if result["sm90"] else "CPU, xla path (not a kernel)"
    _plot(result["sparse"], path, f"2:4 nm_matmul, {result['device_kind']} ({kind})")
    return path


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--replot":
        print("wrote " + replot(sys.argv[2]))
        sys.exit(0)
    sys.exit(exit_status(main()))
