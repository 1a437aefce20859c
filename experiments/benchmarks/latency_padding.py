"""Measured latency of CNN width profiles against the same profiles padded to the widths where a
measured latency grid is fastest (``LatencyModel.fastest_widths``, ``extract(latency_model=)``).

XLA:CPU runs some convolutions slower at a narrower width (a 56-channel conv slower than a
64-channel one, 4-16-channel first convs slower than 20-32: ``experiments/surrogate/RESULTS.md``).
Zero-padding a layer to such a wider width keeps its function and, by the grid, its time drops.
This checks whether whole models get faster, which the grid (terms timed one by one, batch 512,
single-threaded, on the CPU clock) cannot promise by itself.

Steps:

1. The latency model of the surrogate experiment's CNN (``GatedCNN`` 32/64/64/128, strides
   2/2/2/1, 28x28x1): loaded from a ``cnn_latency_table.json`` of a surrogate run
   (``--table``), or measured here as the experiment does (``cnn_latency_grid`` 1/8 ... 8/8,
   batch 512, CPU clock, single-threaded executables).
2. Width profiles: those of a surrogate ``results.json`` (``--results``: every compressed
   point; for latency-form points also the widths before padding), plus ``--random`` random
   profiles in multiples of 4 (seeded). Several results files may be given.
3. Each profile is padded with ``fastest_widths``. Profiles it changes are kept, and the
   unpadded and padded ``SmallCNN`` are timed in one interleaved ``time_callables`` call
   (``--repeats`` rounds, median, eval mode, batch ``--batch``, multi-threaded executables on
   the wall clock: what a user waits), so load drift hits both alike.

The JSON holds, per padded profile, MACs and latency before and after, the measured speedup
(unpadded time / padded time) and the grid's predicted speedup, and a summary for each
``min_gain`` in 0 / 0.02 / 0.05 / 0.1 (pad only where the grid predicts at least that gain; how
many got faster or slower, the median speedup and MAC increase): the evidence for the default
``jaxcompress.latency.PAD_MIN_GAIN`` (0).

Usage::

    python experiments/benchmarks/latency_padding.py \\
        --table runs/surrogate/cnn_latency_table.json \\
        --results runs/surrogate/results.json --random 40 \\
        --out experiments/benchmarks/results/latency_padding_cpu/run1.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import jax.numpy as jnp
import numpy as np
from _timing import report
from channel_multiple import FULL, INPUT, STRIDES, _forward
from flax import nnx

import jaxcompress.latency as L
from jaxcompress.spdy import TimingTable, time_callables

GRID = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
GROUPS = tuple(f"blocks/{i}/gate/alpha" for i in range(len(FULL)))
MIN_GAINS = (0.0, 0.02, 0.05, 0.1)


def cnn_graph() -> L.LayerGraph:
    gated = L.GatedCNN(1, 10, FULL, strides=STRIDES, pool_after=(False,) * 4, rngs=nnx.Rngs(0))
    return L.cost_graph(gated, INPUT)


def latency_model(table: str | None, repeats: int) -> L.LatencyModel:
    graph = cnn_graph()
    if table is not None:
        with open(table) as f:
            return L.LatencyModel.from_table(graph, TimingTable.from_json(f.read()))
    return L.measure_latency_model(
        graph,
        multipliers=GRID,
        batch=512,
        repeats=repeats,
        clock="cpu",
        compiler_options={"xla_cpu_multi_thread_eigen": False},
    )


def profiles_from_results(path: str) -> dict[str, tuple[int, ...]]:
    """``{"<run>/<record>_<key>[/before_padding]": widths}`` of every compressed CNN point of
    a results.json (``<run>``: its folder's name; ``<record>``: the index in ``per_seed``)."""
    with open(path) as f:
        cnn = json.load(f)["cnn"]
    run = os.path.basename(os.path.dirname(os.path.abspath(path)))
    out = {}
    for i, rec in enumerate(cnn.get("per_seed") or [cnn]):
        for method in ("surrogate", "l1", "surrogate_latency"):
            for p in rec.get(method, []):
                name = f"{run}/{i}_{p['key']}"
                out[name] = tuple(int(p["widths"][g]) for g in GROUPS)
                if "widths_before_padding" in p:
                    before = tuple(int(p["widths_before_padding"][g]) for g in GROUPS)
                    out[f"{name}/before_padding"] = before
    return out


def random_profiles(count: int, seed: int) -> dict[str, tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    return {
        f"random{i}": tuple(int(4 * rng.integers(1, w // 4 + 1)) for w in FULL)
        for i in range(count)
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", default=None, help="a surrogate run's cnn_latency_table.json")
    parser.add_argument(
        "--results", nargs="*", default=[], help="surrogate results.json files (cnn task)"
    )
    parser.add_argument("--random", type=int, default=40, help="random profiles to add")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--grid-repeats", type=int, default=30, help="without --table")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    for name, path in [("table", args.table)] + [("results", p) for p in args.results]:
        if path is not None and not os.path.isfile(path):
            parser.error(f"--{name} {path!r} is not a file")
    if args.random < 0:
        parser.error(f"--random must be >= 0, got {args.random}")
    if not args.results and args.random == 0:
        parser.error("nothing to time: give --results or --random > 0")

    model = latency_model(args.table, args.grid_repeats)
    named = random_profiles(args.random, args.seed)
    for path in args.results:
        named.update(profiles_from_results(path))
    pairs = {}
    for name, widths in named.items():
        padded = model.fastest_widths(dict(zip(GROUPS, widths, strict=True)), min_gain=0.0)
        padded = tuple(padded[g] for g in GROUPS)
        if padded != widths:
            pairs[name] = (widths, padded)
    if not pairs:
        print("no profile is padded by this grid")
    unique = sorted({w for pair in pairs.values() for w in pair}, reverse=True)
    built = {w: _forward(w) for w in unique}
    x = jnp.zeros((args.batch, *INPUT), jnp.float32)
    timings = time_callables(
        [(built[w][0], (built[w][1], x)) for w in unique], repeats=args.repeats, warmup=2
    )
    seconds = {w: t.median for w, t in zip(unique, timings, strict=True)}

    def grid_time(widths):
        return float(model.latency(dict(zip(GROUPS, widths, strict=True))))

    rows = {}
    for name, (widths, padded) in pairs.items():
        rows[name] = {
            "widths": list(widths),
            "padded": list(padded),
            "macs": int(built[widths][2]),
            "padded_macs": int(built[padded][2]),
            "latency_ms": 1e3 * seconds[widths],
            "padded_latency_ms": 1e3 * seconds[padded],
            "speedup": seconds[widths] / seconds[padded],
            "grid_speedup": grid_time(widths) / grid_time(padded),
        }
    summary = {"profiles": len(named), "by_min_gain": {}}
    for gain in MIN_GAINS:  # padding only where the grid predicts at least this gain
        kept = [r for r in rows.values() if r["grid_speedup"] >= 1 / (1 - gain) - 1e-9]
        speedups = [r["speedup"] for r in kept]
        summary["by_min_gain"][f"{gain:g}"] = {
            "padded": len(kept),
            "faster": sum(s > 1 for s in speedups),
            "faster_by_5pct": sum(s > 1.05 for s in speedups),
            "slower_by_5pct": sum(s < 1 / 1.05 for s in speedups),
            "median_speedup": statistics.median(speedups) if kept else None,
            "min_speedup": min(speedups) if kept else None,
            "median_grid_speedup": statistics.median(r["grid_speedup"] for r in kept)
            if kept
            else None,
            "median_macs_increase": statistics.median(r["padded_macs"] / r["macs"] for r in kept)
            if kept
            else None,
        }

    def line(name, r):
        return (
            f"{name:34s} {str(tuple(r['widths'])):20s} -> {str(tuple(r['padded'])):20s} "
            f"MACs x{r['padded_macs'] / r['macs']:.2f}  {r['latency_ms']:6.3f} -> "
            f"{r['padded_latency_ms']:6.3f} ms  speedup {r['speedup']:.2f} "
            f"(grid {r['grid_speedup']:.2f})"
        )

    return report("latency_padding", args, rows, summary, line)


if __name__ == "__main__":
    main()
