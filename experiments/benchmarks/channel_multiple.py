"""Latency of extracted CNNs at their exact widths against the same widths rounded up to a
multiple (``extract(multiple=...)``), next to their FLOPs.

The surrogate experiment's CNN (``SmallCNN``, 3x3 convs with strides 2/2/2/1, BatchNorm,
no pools, 28x28x1 inputs) is built at every width profile of a
``python -m experiments.surrogate`` ``results.json`` (all seeds, surrogate and l1 points), at
the uniform multipliers and at full width, and at each profile rounded up to ``--multiple``.
Latency does not depend on weight values, so fresh weights are used. All models are timed in
one interleaved :func:`jaxcompress.spdy.time_callables` call (``--repeats`` rounds, median,
eval mode, batch ``--batch``; ``--clock wall``: multi-threaded executables on the wall clock,
``--clock cpu``: single-threaded ones on the process CPU clock), so load drift hits every
model alike.

For each profile the JSON holds MACs, latency and the reductions relative to full width,
``within_25``: ``|latency reduction - FLOPs reduction| <= 0.25`` (the issue's tolerance),
and ``efficiency``: latency speedup / FLOPs speedup (1 = latency tracks FLOPs). The summary
compares the exact and rounded profiles in the same run.

Usage::

    python experiments/benchmarks/channel_multiple.py --results runs/surrogate/results.json \\
        --out experiments/benchmarks/results/channel_multiple_cpu/run1.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import jax.numpy as jnp
from _timing import report
from flax import nnx

import jaxcompress.latency as L
from jaxcompress.latency.surrogate import round_up_count
from jaxcompress.models import SmallCNN
from jaxcompress.spdy import time_callables

FULL = (32, 64, 64, 128)
STRIDES = (2, 2, 2, 1)
INPUT = (28, 28, 1)


def _round_up(widths, multiple, full=FULL):
    return tuple(round_up_count(w, multiple, f) for w, f in zip(widths, full, strict=True))


def profiles_from_results(path: str) -> dict[str, tuple[int, ...]]:
    """``{"seed<s>_<key>": widths}`` of every compressed CNN point of a results.json."""
    with open(path) as f:
        cnn = json.load(f)["cnn"]
    records = cnn.get("per_seed") or [cnn]
    out = {}
    for s, rec in enumerate(records):
        for method in ("surrogate", "l1"):
            for p in rec[method]:
                widths = tuple(p["widths"][f"blocks/{i}/gate/alpha"] for i in range(len(FULL)))
                out[f"seed{s}_{p['key']}"] = widths
    return out


def _forward(widths):
    model = SmallCNN(1, 10, widths, strides=STRIDES, pool_after=(False,) * 4, rngs=nnx.Rngs(0))
    macs = L.count_macs(model, INPUT)
    view = nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)
    graphdef, state = nnx.split(view)
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state, macs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", required=True, help="a surrogate results.json with a cnn task")
    parser.add_argument("--multiple", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: multi-threaded executables on the wall clock (what a user waits); cpu: "
        "single-threaded executables on the process CPU clock (steadier on a shared machine)",
    )
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    if args.multiple < 2:
        parser.error(f"--multiple must be an int >= 2, got {args.multiple}")
    if not os.path.isfile(args.results):
        parser.error(f"--results {args.results!r} is not a file")

    exact = profiles_from_results(args.results)
    named = {"full": FULL}
    for m in (0.25, 0.5, 0.75):
        named[f"uniform_{m:g}"] = tuple(round(m * w) for w in FULL)
    for key, widths in exact.items():
        named[f"{key}/exact"] = widths
        named[f"{key}/rounded"] = _round_up(widths, args.multiple)
    unique = sorted(set(named.values()), reverse=True)
    built = {w: _forward(w) for w in unique}
    x = jnp.zeros((args.batch, *INPUT), jnp.float32)
    single = {"xla_cpu_multi_thread_eigen": False} if args.clock == "cpu" else None
    timings = time_callables(
        [(built[w][0], (built[w][1], x)) for w in unique],
        repeats=args.repeats,
        warmup=2,
        clock=args.clock,
        compiler_options=single,
    )
    seconds = {w: t.median for w, t in zip(unique, timings, strict=True)}
    noise = {w: t.noise for w, t in zip(unique, timings, strict=True)}
    full_s, full_macs = seconds[FULL], built[FULL][2]

    rows = {}
    for name, widths in named.items():
        macs, s = built[widths][2], seconds[widths]
        flops_red, lat_red = 1 - macs / full_macs, 1 - s / full_s
        rows[name] = {
            "widths": list(widths),
            "macs": int(macs),
            "latency_ms": 1e3 * s,
            "noise": noise[widths],
            "flops_reduction": flops_red,
            "latency_reduction": lat_red,
            "within_25": abs(lat_red - flops_red) <= 0.25,
            "efficiency": (full_s / s) / (full_macs / macs),
        }
    summary = {}
    for kind in ("exact", "rounded"):
        sel = [r for n, r in rows.items() if n.endswith(f"/{kind}")]
        summary[kind] = {
            "profiles": len(sel),
            "within_25": sum(r["within_25"] for r in sel),
            "median_efficiency": statistics.median(r["efficiency"] for r in sel),
            "median_macs_ratio": statistics.median(r["macs"] / full_macs for r in sel),
        }
    summary["uniform_within_25"] = sum(
        rows[f"uniform_{m:g}"]["within_25"] for m in (0.25, 0.5, 0.75)
    )

    def line(name, r):
        return (
            f"{name:28s} {str(tuple(r['widths'])):20s} MACs {r['macs']:>9,d} "
            f"{r['latency_ms']:7.3f} ms  FLOPs -{r['flops_reduction']:.1%} "
            f"latency -{r['latency_reduction']:.1%}  eff {r['efficiency']:.2f}"
            f"{'' if r['within_25'] else '  (outside 25%)'}"
        )

    return report("channel_multiple", args, rows, summary, line)


if __name__ == "__main__":
    main()
