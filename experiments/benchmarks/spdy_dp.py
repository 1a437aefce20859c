"""The jit-compiled SPDY DP against an independent NumPy oracle of the reference ``SPDY.dp``.

For every shipped timing table (``spdy_timings/*.txt``: the reference's first/last layers
skipped, prior errors, reference budget, ``B = 10 000``, float64) and every target in
``--targets``:

* **parity**: coefficient 1 and ``--batch`` random coefficient vectors ``c ~ U[0, 1]^L``
  (seeded); the profile, the DP cost and the buckets used must be *identical* to the oracle's
  (``spdy_oracle.py`` beside this script, a NumPy restatement written from the spec). Any difference
  aborts the run.
* **single solve**: ``jaxcompress.spdy.solve`` end to end (host preparation cached, cost
  transfer, DP, backtracking, ``block_until_ready``) vs one oracle call, compiled and warmed
  up, ``--repeats`` runs each, the two interleaved so that load drift on a shared machine
  hits both; median wall time and median process CPU time (less inflated by contention).
* **batched throughput**: ``solve_batch`` over the ``--batch`` vectors vs the oracle looped
  over them, interleaved the same way (``--batch-repeats`` runs, after one compiling run);
  the profiles of every vector are checked against the oracle's.

Targets a table cannot reach are reported with the maximum modelled speedup and skipped.

Usage::

    python experiments/benchmarks/spdy_dp.py --out results/spdy_dp.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

import jax
import numpy as np
from _timing import write_json  # beside this script, as spdy_oracle
from spdy_oracle import oracle_solve

from jaxcompress import spdy

_HERE = os.path.dirname(os.path.abspath(__file__))

TABLES = [
    "rn18_unstr",
    "rn34_unstr",
    "rn50_unstr",
    "rn101_unstr",
    "2rn50_unstr",
    "rn50_4block",
    "yolov5s_unstr",
    "yolov5m_unstr",
]
# ``firstlast_names`` of the reference CLI: conv1/fc for ResNets, model.0.conv for YOLOv5
SKIP = {"yolov5s_unstr": ("model.0.conv",), "yolov5m_unstr": ("model.0.conv",)}
DEFAULT_SKIP = ("conv1", "fc")


def _data_dir(arg: str | None) -> str:
    root = arg or os.environ.get("JAXCOMPRESS_DATA_DIR")
    if root is None:
        root = os.path.normpath(os.path.join(_HERE, "..", "..", "..", "shared", "data"))
    path = os.path.join(root, "spdy_timings")
    if not os.path.isdir(path):
        raise SystemExit(f"timing tables not found under {path!r}; pass --data")
    return path


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def _interleaved(fns: dict, repeats: int) -> dict:
    samples = {k: ([], []) for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            w, c = _timed(fn)
            samples[k][0].append(w)
            samples[k][1].append(c)
    return {
        k: {"wall_ms": 1e3 * statistics.median(w), "cpu_ms": 1e3 * statistics.median(c)}
        for k, (w, c) in samples.items()
    }


def _check(name, target, i, sol_choice, sol_cost, sol_used, ref):
    got = (np.asarray(sol_choice).tolist(), float(sol_cost), int(sol_used))
    if got != tuple(ref):
        raise AssertionError(
            f"{name} {target}x vector {i}: jax {got[1]!r}/{got[2]} vs oracle {ref[1]!r}/{ref[2]}; "
            f"profiles equal: {got[0] == ref[0]}"
        )


def bench_case(table, name, target, skip, args, rng):
    kept = table.drop(skip)
    try:
        t = spdy.budget(table, target, skip=skip, reference_budget=True)
    except ValueError:
        return {
            "table": name,
            "target": target,
            "status": "unreachable",
            "max_speedup": spdy.max_speedup(table, skip=skip, reference_budget=True),
        }
    times = kept.times()
    errors = spdy.prior_errors(kept)
    lengths = [e.shape[0] for e in errors]
    num_layers, width = len(errors), max(lengths)
    prior = np.zeros((num_layers, width))
    for i, e in enumerate(errors):
        prior[i, : e.shape[0]] = e
    coefs = rng.uniform(size=(args.batch, num_layers))
    batch = prior[None] * coefs[:, :, None]
    ragged_batch = [[row[: lengths[i]].tolist() for i, row in enumerate(c)] for c in batch]
    times_2d = np.zeros((num_layers, width))
    for i, r in enumerate(times):
        times_2d[i, : r.shape[0]] = r

    # parity at coefficient 1
    one = spdy.solve(errors, times, t)
    ref_one = oracle_solve([e.tolist() for e in errors], times, t)
    _check(name, target, "c=1", one.choice, one.cost, one.buckets_used, ref_one)

    costs = [e * coefs[0, i] for i, e in enumerate(errors)]
    costs_lists = ragged_batch[0]
    single = _interleaved(
        {
            "jax": lambda: jax.block_until_ready(spdy.solve(costs, times, t)),
            "oracle": lambda: oracle_solve(costs_lists, times, t),
        },
        args.repeats,
    )

    # batched: compile once, then interleave; every oracle run is checked against jax's
    results = {}

    def run_jax():
        results["jax"] = jax.block_until_ready(
            spdy.solve_batch(batch, times_2d, t, lengths=lengths)
        )

    def run_oracle():
        results["oracle"] = [oracle_solve(c, times, t) for c in ragged_batch]

    run_jax()
    batched = _interleaved({"jax": run_jax, "oracle": run_oracle}, args.batch_repeats)
    out = results["jax"]
    for i, ref in enumerate(results["oracle"]):
        _check(name, target, i, out.choice[i], out.cost[i], out.buckets_used[i], ref)
    prep = spdy.prepare(times, t)
    return {
        "table": name,
        "target": target,
        "status": "ok",
        "layers": num_layers,
        "options": width,
        "window": prep.valid_width,
        "dp_cost_c1": float(one.cost),
        "buckets_used_c1": int(one.buckets_used),
        "parity_vectors": args.batch + 1,
        "single": single,
        "single_speedup_wall": single["oracle"]["wall_ms"] / single["jax"]["wall_ms"],
        "single_speedup_cpu": single["oracle"]["cpu_ms"] / single["jax"]["cpu_ms"],
        "batch": batched,
        "batch_speedup_wall": batched["oracle"]["wall_ms"] / batched["jax"]["wall_ms"],
        "batch_speedup_cpu": batched["oracle"]["cpu_ms"] / batched["jax"]["cpu_ms"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="data root holding spdy_timings/")
    parser.add_argument("--tables", nargs="*", default=TABLES)
    parser.add_argument("--targets", nargs="*", type=float, default=[1.5, 2.0, 2.5, 3.0])
    parser.add_argument("--batch", type=int, default=100, help="random coefficient vectors")
    parser.add_argument("--repeats", type=int, default=15, help="single-solve timing runs")
    parser.add_argument("--batch-repeats", type=int, default=2, help="batched timing runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write JSON results here")
    args = parser.parse_args(argv)
    data = _data_dir(args.data)
    rng = np.random.default_rng(args.seed)
    rows = []
    for name in args.tables:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the YOLO files repeat one dense entry
            table = spdy.TimingTable.load(os.path.join(data, f"{name}.txt"))
        skip = tuple(n for n in SKIP.get(name, DEFAULT_SKIP) if n in table.names)
        for target in args.targets:
            row = bench_case(table, name, target, skip, args, rng)
            rows.append(row)
            if row["status"] != "ok":
                print(f"{name:<14} {target:>4.1f}x  unreachable (max {row['max_speedup']:.3f}x)")
                continue
            s, b = row["single"], row["batch"]
            print(
                f"{name:<14} {target:>4.1f}x L={row['layers']:<3} W={row['window']:<5} parity ok "
                f"| single jax {s['jax']['wall_ms']:7.2f} ms, oracle {s['oracle']['wall_ms']:7.2f}"
                f" ms: x{row['single_speedup_wall']:5.1f} (cpu x{row['single_speedup_cpu']:5.1f})"
                f" | batch{args.batch} jax {b['jax']['wall_ms']:8.1f} ms, oracle "
                f"{b['oracle']['wall_ms']:8.1f} ms: x{row['batch_speedup_wall']:5.1f} "
                f"(cpu x{row['batch_speedup_cpu']:5.1f})",
                flush=True,
            )
    ok = [r for r in rows if r["status"] == "ok"]
    summary = {
        "cases": len(ok),
        "median_single_speedup_wall": statistics.median(r["single_speedup_wall"] for r in ok),
        "median_single_speedup_cpu": statistics.median(r["single_speedup_cpu"] for r in ok),
        "median_batch_speedup_wall": statistics.median(r["batch_speedup_wall"] for r in ok),
        "median_batch_speedup_cpu": statistics.median(r["batch_speedup_cpu"] for r in ok),
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        meta = {
            "jax": jax.__version__,
            "device": str(jax.devices()[0]),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "loadavg_end": os.getloadavg(),
            "args": vars(args),
        }
        write_json(args.out, {"meta": meta, "summary": summary, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
