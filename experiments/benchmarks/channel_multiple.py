"""Latency of extracted models at their exact kept counts against the same counts rounded up to
a multiple (``jaxcompress.latency.round_to_multiple``), next to their MACs.

Reads a ``python -m experiments.surrogate`` ``results.json`` holding an image task (``cnn`` or
``resnet20``), rebuilds that task's full model (fresh weights: latency does not depend on the
values) and, for every compressed point of every seed, the model pruned to the point's kept
counts (``jaxcompress.structure.prune``, the first units of every group) and to those counts
rounded up to ``--multiple``, plus the uniform-width points. All are timed in one interleaved
:func:`jaxcompress.spdy.time_callables` call (``--repeats`` rounds, median, inference mode,
batch ``--batch``; ``--clock wall``: multi-threaded executables on the wall clock, ``--clock
cpu``: single-threaded ones on the process CPU clock), so load drift hits every model alike.

For each profile the JSON holds MACs, latency, the reductions relative to full width,
``within_25`` (``|latency reduction - FLOPs reduction| <= 0.25``) and ``efficiency`` (latency
speedup / FLOPs speedup; 1 = latency tracks FLOPs); the summary compares exact and rounded.

Usage::

    python experiments/benchmarks/channel_multiple.py --results runs/surrogate/results.json \\
        --task cnn --out experiments/benchmarks/results/channel_multiple_cpu/run3.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import numpy as np
from _timing import add_clock_flags, clock_options, report, time_models

from jaxcompress import structure as S

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from experiments.surrogate.tasks import image_model  # noqa: E402

SHAPES = {"fashion_mnist": (28, 28, 1, 10), "mnist": (28, 28, 1, 10), "digits": (8, 8, 1, 10)}


def profiles(results: dict, task: str, multiple: int) -> dict[str, dict[str, int]]:
    """``{name: kept counts}``: every compressed point (exact and rounded up to ``multiple``)
    and uniform point of ``task`` in ``results``, over all seeds; ``"full"`` is ``{}``."""
    res = results[task]
    out: dict[str, dict[str, int]] = {"full": {}}
    for s, record in enumerate(res.get("per_seed") or [res]):
        for method in ("surrogate", "l1"):
            for p in record.get(method, []):
                kept = {n: int(k) for n, k in p["kept"].items()}
                rounded = {n: min(int(p["sizes"][n]), -(-k // multiple) * multiple)
                           for n, k in kept.items()}  # fmt: skip
                out[f"seed{s}_{p['key']}/exact"] = kept
                out[f"seed{s}_{p['key']}/rounded"] = rounded
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", required=True, help="a surrogate results.json")
    parser.add_argument("--task", choices=("cnn", "resnet20"), default="cnn")
    parser.add_argument("--multiple", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    add_clock_flags(parser, clock="wall")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    if args.multiple < 2:
        parser.error(f"--multiple must be an int >= 2, got {args.multiple}")
    if not os.path.isfile(args.results):
        parser.error(f"--results {args.results!r} is not a file")
    with open(args.results) as f:
        results = json.load(f)
    if args.task not in results:
        parser.error(f"--results holds no {args.task!r} task (tasks: {results['config']['tasks']})")

    config = results["config"]
    h, w, c, classes = SHAPES[results[args.task]["dataset"]]
    full = image_model(args.task, config["width"], c, classes, seed=0)
    example = np.zeros((1, h, w, c), np.float32)
    sizes = S.macs(full, example).sizes
    named = profiles(results, args.task, args.multiple)
    for m in (0.25, 0.5, 0.75):
        named[f"uniform_{m:g}"] = {n: max(1, round(m * size)) for n, size in sizes.items()}
    unique = {}
    for counts in named.values():
        unique.setdefault(tuple(sorted(counts.items())), counts)
    models = {}
    for key, counts in unique.items():
        keep = {n: np.arange(sizes[n]) < k for n, k in counts.items()}
        models[key] = S.prune(full, keep, example) if keep else full
    x = np.zeros((args.batch, h, w, c), np.float32)
    seconds, noise, macs = time_models(
        models,
        x,
        repeats=args.repeats,
        clock=args.clock,
        compiler_options=clock_options(args.clock),
    )
    full_key = ()
    rows = {}
    for name, counts in named.items():
        k = tuple(sorted(counts.items()))
        flops_red = 1 - macs[k] / macs[full_key]
        lat_red = 1 - seconds[k] / seconds[full_key]
        rows[name] = {
            "kept": counts,
            "macs": macs[k],
            "latency_ms": 1e3 * seconds[k],
            "noise": noise[k],
            "flops_reduction": flops_red,
            "latency_reduction": lat_red,
            "within_25": abs(lat_red - flops_red) <= 0.25,
            "efficiency": (seconds[full_key] / seconds[k]) / (macs[full_key] / macs[k]),
        }
    summary = {}
    for kind in ("exact", "rounded"):
        sel = [r for n, r in rows.items() if n.endswith(f"/{kind}")]
        if sel:
            summary[kind] = {
                "profiles": len(sel),
                "within_25": sum(r["within_25"] for r in sel),
                "median_efficiency": statistics.median(r["efficiency"] for r in sel),
                "median_macs_ratio": statistics.median(r["macs"] / macs[full_key] for r in sel),
            }

    def line(name, r):
        return (
            f"{name:34s} MACs {r['macs']:>11,d} {r['latency_ms']:8.3f} ms  "
            f"FLOPs -{r['flops_reduction']:.1%} latency -{r['latency_reduction']:.1%}  "
            f"eff {r['efficiency']:.2f}{'' if r['within_25'] else '  (outside 25%)'}"
        )

    return report("channel_multiple", args, rows, summary, line)


if __name__ == "__main__":
    main()
