"""How well a measured :class:`jaxcompress.latency.LatencyModel` predicts the end-to-end
latency of pruned models, next to how well MACs do.

For one model (``--model``: the surrogate study's CNN, ResNet-20, the SST-2 transformer or
LeNet-300-100), the latency model is measured on the current device
(:func:`jaxcompress.latency.measure_latency_model`: every traced contraction timed on a width
grid, plus the overhead outside them). Then ``--patterns`` random keep patterns (every group
keeps its first ``round(f n)`` units, ``f`` uniform in ``[--min-fraction, 1]``) and the uniform
widths 0.25/0.5/0.75 are pruned for real (:func:`jaxcompress.structure.prune`) and the full
and pruned models' jitted inference forward passes timed in one interleaved
:func:`jaxcompress.spdy.time_callables` call (``_timing.time_models``; median of ``--repeats``
rounds), so load drift hits every model alike.

Per pattern the JSON holds the MACs, the predicted and measured latency and their ratios to the
full model; the summary holds the Spearman rank correlation with the measured latency of the
prediction and of the MACs, the median and largest relative error of the predicted latency
and of the predicted speed-up (``predicted ratio / measured ratio - 1``), and, for contrast,
the error of predicting the speed-up by the MAC ratio. A scatter plot (predicted and MAC-based
ratio against measured) is written next to the JSON.

Usage::

    python experiments/benchmarks/latency_model.py --model cnn --patterns 12 \\
        --out experiments/benchmarks/results/latency_model_cpu/cnn.json
"""

from __future__ import annotations

import argparse
import os
import statistics

import jax
import numpy as np
from _timing import add_clock_flags, clock_options, report, time_models
from flax import nnx

from jaxcompress import latency as L
from jaxcompress import structure as S
from jaxcompress.models import MLP, SmallCNN, TransformerClassifier, resnet20


def build(name: str, batch: int) -> tuple[nnx.Module, np.ndarray]:
    """The full model (fresh weights: latency does not depend on the values) and a batch of
    inputs for it."""
    rngs = nnx.Rngs(0)
    if name == "cnn":
        model = SmallCNN(1, 10, (32, 64, 64, 128), strides=(2, 2, 2, 1),
                         pool_after=(False,) * 4, rngs=rngs)  # fmt: skip
        return model, np.zeros((batch, 28, 28, 1), np.float32)
    if name == "resnet20":
        return resnet20(in_channels=1, num_classes=10, rngs=rngs), np.zeros(
            (batch, 28, 28, 1), np.float32
        )
    if name == "transformer":
        model = TransformerClassifier(8192, 2, max_len=64, rngs=rngs)
        return model, np.ones((batch, 64), np.int32)
    if name == "mlp":
        return MLP(784, (300, 100), 10, rngs=rngs), np.zeros((batch, 784), np.float32)
    raise ValueError(f"model must be cnn, resnet20, transformer or mlp, got {name!r}")


def patterns(
    sizes: dict[str, int], count: int, min_fraction: float, seed: int
) -> dict[str, dict[str, int]]:
    """``{name: kept counts}``: the full model, three uniform widths and ``count`` random ones."""
    out: dict[str, dict[str, int]] = {"full": dict(sizes)}
    for m in (0.25, 0.5, 0.75):
        out[f"uniform_{m:g}"] = {n: max(1, round(m * s)) for n, s in sizes.items()}
    rng = np.random.default_rng(seed)
    for i in range(count):
        fractions = dict(zip(sizes, rng.uniform(min_fraction, 1.0, len(sizes)), strict=True))
        out[f"random_{i}"] = {n: max(1, round(fractions[n] * s)) for n, s in sizes.items()}
    return out


def _spearman(a, b) -> float:
    ra = np.argsort(np.argsort(np.asarray(a)))
    rb = np.argsort(np.argsort(np.asarray(b)))
    return float(np.corrcoef(ra, rb)[0, 1])


def _plot(rows: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r["measured_ratio"] for r in rows.values()]
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.scatter(measured, [r["predicted_ratio"] for r in rows.values()], label="latency model")
    ax.scatter(measured, [r["macs_ratio"] for r in rows.values()], marker="x", label="MACs")
    ax.plot([0, 1.05], [0, 1.05], color="grey", lw=0.8)
    ax.set(xlabel="measured latency / full", ylabel="predicted / full", title=title)
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 1.05)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("cnn", "resnet20", "transformer", "mlp"), default="cnn")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--patterns", type=int, default=12, help="random keep patterns")
    parser.add_argument("--min-fraction", type=float, default=0.2)
    parser.add_argument("--grid", default="0.25,0.5,0.75,1.0", help="width fractions to time")
    add_clock_flags(parser, clock="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON output path (the plot goes beside it)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.patterns < 0 or args.repeats < 3:
        parser.error("--batch must be >= 1, --patterns >= 0 and --repeats >= 3")
    if not 0 < args.min_fraction <= 1:
        parser.error(f"--min-fraction must be in (0, 1], got {args.min_fraction}")
    try:
        grid = tuple(float(g) for g in args.grid.split(","))
    except ValueError:
        parser.error(f"--grid must be comma-separated fractions, got {args.grid!r}")

    model, x = build(args.model, args.batch)
    options = clock_options(args.clock)
    lat = L.measure_latency_model(
        model, x, grid=grid, repeats=args.repeats, clock=args.clock, compiler_options=options
    )
    sizes = dict(lat.sizes)
    named = patterns(sizes, args.patterns, args.min_fraction, args.seed)
    models = {}
    for name, kept in named.items():
        keep = {n: np.arange(sizes[n]) < k for n, k in kept.items()}
        models[name] = model if name == "full" else S.prune(model, keep, x)
    seconds, noise, macs = time_models(
        models, x, repeats=args.repeats, clock=args.clock, compiler_options=options
    )
    predicted = {n: float(lat(kept)) for n, kept in named.items()}
    rows = {}
    for n, kept in named.items():
        rows[n] = {
            "kept": kept,
            "macs": macs[n],
            "macs_ratio": macs[n] / macs["full"],
            "measured_ms": 1e3 * seconds[n],
            "noise": noise[n],
            "predicted_ms": 1e3 * predicted[n],
            "measured_ratio": seconds[n] / seconds["full"],
            "predicted_ratio": predicted[n] / predicted["full"],
        }
    pruned = [r for n, r in rows.items() if n != "full"]
    err = [abs(r["predicted_ms"] / r["measured_ms"] - 1) for r in pruned]
    ratio_err = [abs(r["predicted_ratio"] / r["measured_ratio"] - 1) for r in pruned]
    macs_err = [abs(r["macs_ratio"] / r["measured_ratio"] - 1) for r in pruned]
    summary = {
        "device": str(jax.devices()[0]),
        "patterns": len(pruned),
        "spearman_predicted": _spearman(
            [r["predicted_ms"] for r in pruned], [r["measured_ms"] for r in pruned]
        ),
        "spearman_macs": _spearman([r["macs"] for r in pruned], [r["measured_ms"] for r in pruned]),
        "median_latency_error": statistics.median(err),
        "max_latency_error": max(err),
        "median_ratio_error": statistics.median(ratio_err),
        "max_ratio_error": max(ratio_err),
        "median_ratio_error_macs": statistics.median(macs_err),
        "max_ratio_error_macs": max(macs_err),
        "full_measured_ms": rows["full"]["measured_ms"],
        "full_predicted_ms": rows["full"]["predicted_ms"],
    }

    def line(name, r):
        return (
            f"{name:12s} MACs {r['macs_ratio']:.3f}  measured {r['measured_ms']:8.3f} ms "
            f"({r['measured_ratio']:.3f})  predicted {r['predicted_ms']:8.3f} ms "
            f"({r['predicted_ratio']:.3f})  noise {r['noise']:.2f}"
        )

    result = report("latency_model", args, rows, summary, line)
    if args.out:
        _plot(rows, os.path.splitext(args.out)[0] + ".png", f"{args.model}, {args.clock} clock")
    return result


if __name__ == "__main__":
    main()
