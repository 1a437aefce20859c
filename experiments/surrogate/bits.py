"""Mixed precision picked in one training run: bit-level gates (``jc.latency.quantize``) on
LeNet-300-100 against uniform bit-widths at the same training budget.

``python -m experiments.surrogate.bits [--target 0.5] [--out DIR]``

1. A dense :class:`jaxcompress.models.MLP` is trained in float for ``--epochs`` epochs.
2. **Surrogate:** every kernel gets ``--levels`` residual-level gates (decreasing start
   ``linspace(1, 0.9)``: the l1/l2 ratio has no gradient at equal gates) and trains for
   ``--epochs`` more epochs with :func:`jaxcompress.latency.surrogate_penalty` on the
   bit-weighted MACs (``Quantized.macs``: every layer's MACs times its bit-width) steered to
   ``--target`` of the 8-bit cost by a :func:`~jaxcompress.latency.lambda_controller`
   (``feedback="active"``), then :func:`~jaxcompress.latency.extract` fixes each layer's bits.
3. **Uniform:** for every bit-width ``b`` the same float model is quantization-aware trained
   (straight-through) for the same ``--epochs`` with its gates frozen at ``b`` levels.
4. **Float:** the float model trained the same extra epochs, unquantized.

Prints a table and writes ``results.json`` (atomically) to ``--out``. A throwaway study: no
resume, one seed; the numbers and the command that made them are in RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxcompress as jc
from jaxcompress import latency as L
from jaxcompress.checkpoint import write_json_atomic


def _frozen_gates(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` on every parameter but the bit gates, which stay where they are."""

    def labels(params: Any) -> Any:
        def label(path, _):
            names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
            return "gate" if "gates" in names else "weight"

        return jax.tree_util.tree_map_with_path(label, params)

    return optax.multi_transform({"weight": tx, "gate": optax.set_to_zero()}, labels)


def _bits(q: L.Quantized, levels: int, bits: int) -> None:
    for gate in q.gates.values():
        gate[...] = jnp.asarray(np.arange(levels) < bits, jnp.float32)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=float, default=0.5, help="bit-MACs / 8-bit bit-MACs")
    parser.add_argument("--levels", type=int, default=8, help="quantization levels (bits)")
    parser.add_argument("--epochs", type=int, default=2, help="float epochs, then gated epochs")
    parser.add_argument("--train-subset", type=int, default=30_000)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--gain", type=float, default=0.01, help="lambda controller gain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=None, help="folder for results.json")
    args = parser.parse_args(argv)
    if not 0 < args.target < 1:
        parser.error(f"--target must be in (0, 1), got {args.target}")
    if not 2 <= args.levels <= 16 or args.epochs < 1 or args.train_subset < 128:
        parser.error("--levels must be in [2, 16], --epochs >= 1 and --train-subset >= 128")
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out!r} exists and is not a folder")

    t0 = time.perf_counter()
    train = jc.data.mnist("train", args.data_dir)
    test = jc.data.mnist("test", args.data_dir)
    train = jc.data.subset(train, args.train_subset, seed=args.seed)
    fit = dict(epochs=args.epochs, batch_size=128, seed=args.seed, progress=False)
    x = jnp.asarray(train.x[:8])

    dense = jc.models.MLP(rngs=nnx.Rngs(args.seed))
    jc.train.fit(dense, optax.adam(1e-3), train, **fit)
    rows: dict[str, dict[str, Any]] = {}

    float_model = nnx.clone(dense)
    jc.train.fit(float_model, optax.adam(args.learning_rate), train, **fit)
    rows["float"] = {"accuracy": jc.train.evaluate(float_model, test)["accuracy"], "ratio": None}

    q = L.quantize(nnx.clone(dense), x, levels=args.levels, init=np.linspace(1.0, 0.9, args.levels))
    macs = q.macs
    ctrl = L.lambda_controller(args.target * macs.dense, macs, lam0=0.05, gain=args.gain)
    tx = optax.chain(
        L.surrogate_penalty(macs, ctrl, feedback="active"),
        optax.adam(args.learning_rate),
        L.project_nonnegative(prune_below=0.05),
    )
    jc.train.fit(q, tx, train, **fit)
    ext = L.extract(q, x)
    rows["surrogate"] = {
        "accuracy": jc.train.evaluate(ext.model, test)["accuracy"],
        "ratio": ext.macs / macs.dense,
        "bits": dict(ext.bits),
    }

    for b in range(1, args.levels + 1):
        u = L.quantize(nnx.clone(dense), x, levels=args.levels)
        _bits(u, args.levels, b)
        jc.train.fit(u, _frozen_gates(optax.adam(args.learning_rate)), train, **fit)
        rows[f"uniform_{b}"] = {
            "accuracy": jc.train.evaluate(u, test)["accuracy"],
            "ratio": b / args.levels,
            "bits": dict.fromkeys(u.gates, b),
        }

    s = rows["surrogate"]
    cheaper = [r for k, r in rows.items() if k.startswith("uniform") and r["ratio"] <= s["ratio"]]
    best = max(cheaper, key=lambda r: r["accuracy"]) if cheaper else None
    summary = {
        "landing": s["ratio"] / args.target - 1,
        "surrogate_minus_best_uniform_within_budget": (
            None if best is None else s["accuracy"] - best["accuracy"]
        ),
        "seconds": time.perf_counter() - t0,
    }
    for name, r in rows.items():
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        bits = ",".join(str(v) for v in r.get("bits", {}).values()) or "float"
        print(f"{name:11s} bit-MACs {ratio:>6s}  bits {bits:15s} accuracy {r['accuracy']:.4f}")
    landing, wall = summary["landing"], summary["seconds"]
    print(f"landing {landing:+.1%} of the target {args.target}; wall {wall:.0f} s")
    result = {"config": vars(args), "rows": rows, "summary": summary}
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
        write_json_atomic(os.path.join(args.out, "results.json"), result)
    return result


if __name__ == "__main__":
    main()
