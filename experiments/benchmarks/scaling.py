"""Collectives and step time of CrAM, AC/DC and GMP against their inner optimizer, sharded.

For each model, sharding (``dp``: params replicated, batch over ``data=8``; ``fsdp``: params
split by the FSDP rule over ``fsdp=4``, batch over ``data=2,fsdp=4``) and optimizer
(``inner``: SGD with momentum 0.9; ``cram``, ``acdc``, ``gmp`` wrapping it), this script builds
the training step of ``jaxcompress.train.make_train_step(..., mesh=...)`` and reports

* **collectives per step**, read from the compiled HLO (per-device result shapes): count and
  bytes of every ``all-reduce``, ``all-gather``, ``reduce-scatter``, ``all-to-all`` and
  ``collective-permute``, the number of scalar all-reduce operands, and any all-gather whose
  result has the full shape of a sharded parameter (there should be none);
* **step time**: every step is compiled and warmed up, then the variants are timed in
  interleaved rounds (one call each per round, ``block_until_ready``, no donation, the same
  state every call). The ratio is the median over rounds of ``variant / inner`` within a round
  (a change of load in the middle of the run affects both alike); the medians per variant are
  reported too.

The state is timed after three real training steps: AC/DC (schedule warm-up 2 steps) is in a
compressed phase between mask updates, ``gmp`` (a mask update every 50 steps) is between two
updates (the common step), ``gmp_every_step`` (``every=1``) recomputes its global mask at every
step (the worst case), CrAM computes a mask at a drawn sparsity every step, as it must.

GSPMD's FSDP gathers a weight where its matmul needs it (as ZeRO-3 does) unless moving the
activations is cheaper; the ``whole AG`` column counts all-gathers whose result is a whole
sharded parameter, and ``+wAG`` those beyond the inner optimizer's (the compression logic's
own: 0 expected; CrAM's second forward/backward pass gathers as the first does).

Targets of the pod-scale issue: AC/DC and GMP at most 100 scalar
all-reduces more than the inner optimizer and at most 1.05x its step time; CrAM at most 2x its
gradient all-reduce bytes plus 100 scalars, and at most 2.15x its step time.

The 8 devices are emulated on the host CPU (``--xla_force_host_platform_device_count=8``):
collective bytes are those a real mesh would move; step times include the host's thread
contention and say little about a real pod.

Usage::

    python experiments/benchmarks/scaling.py --out experiments/benchmarks/results/scaling/cpu8.json
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from jaxcompress import optim, train  # noqa: E402
from jaxcompress.checkpoint import write_json_atomic  # noqa: E402
from jaxcompress.models import MLP, SmallCNN  # noqa: E402

SHARDINGS = {"dp": ("data=8", "replicated"), "fsdp": ("data=2,fsdp=4", "fsdp")}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_OP = re.compile(r"=(.*?)\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument(
        "--models", nargs="+", choices=("mlp", "smallcnn"), default=["mlp", "smallcnn"]
    )
    parser.add_argument("--batch", type=int, default=64, help="global batch (multiple of 8)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds")
    args = parser.parse_args(argv)
    if args.batch % 8 or args.batch <= 0:
        parser.error(f"--batch must be a positive multiple of 8, got {args.batch}")
    if args.rounds < 5:
        parser.error(f"--rounds must be >= 5, got {args.rounds}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        parser.error(f"--out: directory {out_dir} is not writable")
    return args


def _model(name: str) -> tuple[nnx.Module, tuple[int, ...]]:
    if name == "mlp":  # LeNet-300-100
        return MLP(784, (300, 100), 10, rngs=nnx.Rngs(0)), (784,)
    return SmallCNN(1, 10, rngs=nnx.Rngs(0)), (28, 28, 1)


def _optimizers() -> dict[str, tuple[optax.GradientTransformation, bool]]:
    inner = optax.sgd(0.05, momentum=0.9)
    return {
        "inner": (inner, False),
        "cram": (optim.cram(inner, rho=0.05, sparsities=(0.5, 0.7, 0.9)), True),
        "acdc": (
            optim.acdc(
                inner,
                sparsity=0.9,
                schedule=optim.acdc_schedule(
                    warmup_steps=2,
                    compressed_steps=100,
                    decompressed_steps=100,
                    final_compressed_steps=100,
                    total_steps=1000,
                ),
            ),
            False,
        ),
        "gmp": (optim.gmp(inner, sparsity=0.9, begin_step=0, end_step=1000, every=50), False),
        "gmp_every_step": (
            optim.gmp(inner, sparsity=0.9, begin_step=0, end_step=1000, every=1),
            False,
        ),
    }


def collectives(hlo: str) -> dict:
    """Count and bytes per collective kind from compiled HLO text (per-device shapes)."""
    out = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    scalars = 0
    gathered: list[tuple[int, ...]] = []
    for line in hlo.splitlines():
        match = _OP.search(line)
        if match is None or "-done" in line.split("=")[1].split("(")[0]:
            continue
        kind = match[2]
        shapes = [
            (dtype, tuple(int(d) for d in dims.split(",") if d))
            for dtype, dims in _SHAPE.findall(match[1])
        ]
        out[kind]["count"] += 1
        for dtype, shape in shapes:
            size = int(np.prod(shape)) if shape else 1
            out[kind]["bytes"] += size * _DTYPE_BYTES.get(dtype, 4)
            if kind == "all-reduce" and size == 1:
                scalars += 1
            if kind == "all-gather":
                gathered.append(shape)
    out["scalar_all_reduce_operands"] = scalars
    out["all_gather_shapes"] = [list(s) for s in gathered]
    return out


def _variant(model_name: str, sharding: str, opt: str, batch: int, x, y) -> dict:
    mesh, rule = SHARDINGS[sharding]
    model, _ = _model(model_name)
    tx, pass_grad_fn = _optimizers()[opt]
    graphdef, params, rest = train.split_model(train.train_view(model))
    step = train.make_train_step(
        graphdef, tx, pass_grad_fn=pass_grad_fn, mesh=mesh, param_sharding=rule, donate=False
    )
    params, rest, state = step.place(params, rest, tx.init(params))
    sharded_shapes = {
        tuple(a.shape) for a in jax.tree.leaves(params) if not a.sharding.is_fully_replicated
    }
    start = time.perf_counter()
    compiled = step.lower(params, rest, state, x[:batch], y[:batch]).compile()
    compile_s = time.perf_counter() - start
    stats = collectives(compiled.as_text())
    stats["whole_param_all_gathers"] = [
        s for s in stats.pop("all_gather_shapes") if tuple(s) in sharded_shapes
    ]
    for i in range(3):  # real steps: AC/DC compressed, GMP ramping, CrAM drawing
        sl = slice(i * batch, (i + 1) * batch)
        params, rest, state, _ = step(params, rest, state, x[sl], y[sl])
    args = (params, rest, state, x[:batch], y[:batch])
    jax.block_until_ready(step(*args))
    return {"step": step, "args": args, "collectives": stats, "compile_s": compile_s}


def _time(variants: dict[str, dict], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, v in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(v["step"](*v["args"]))
            times[name].append(time.perf_counter() - start)
    return times


def main(argv=None) -> dict:
    args = _parse(argv)
    rng = np.random.default_rng(0)
    rows = []
    for model_name in args.models:
        _, shape = _model(model_name)
        x = rng.random((4 * args.batch, *shape), dtype=np.float32)
        y = rng.integers(0, 10, 4 * args.batch).astype(np.int32)
        for sharding in SHARDINGS:
            variants = {
                opt: _variant(model_name, sharding, opt, args.batch, x, y) for opt in _optimizers()
            }
            times = _time(variants, args.rounds)
            inner = variants["inner"]["collectives"]
            for opt, v in variants.items():
                c = v["collectives"]
                ratios = [t / b for t, b in zip(times[opt], times["inner"], strict=True)]
                rows.append(
                    {
                        "model": model_name,
                        "sharding": sharding,
                        "mesh": SHARDINGS[sharding][0],
                        "optimizer": opt,
                        "collectives": c,
                        "extra_whole_param_all_gathers": len(c["whole_param_all_gathers"])
                        - len(inner["whole_param_all_gathers"]),
                        "extra_scalar_all_reduces": c["scalar_all_reduce_operands"]
                        - inner["scalar_all_reduce_operands"],
                        "all_reduce_bytes_ratio": c["all-reduce"]["bytes"]
                        / max(inner["all-reduce"]["bytes"], 1),
                        "median_step_s": statistics.median(times[opt]),
                        "ratio_to_inner": statistics.median(ratios),
                        "ratio_iqr": [float(q) for q in np.percentile(ratios, [25, 75])],
                        "compile_s": v["compile_s"],
                    }
                )
    result = {
        "benchmark": "scaling",
        "argv": vars(args),
        "machine": {
            "platform": jax.devices()[0].platform,
            "devices": jax.device_count(),
            "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()),
            "python": platform.python_version(),
            "jax": jax.__version__,
        },
        "rows": rows,
    }
    write_json_atomic(args.out, result)
    header = (
        f"{'model':9} {'shard':5} {'opt':14} {'AR n':>5} {'AR bytes':>10} {'AG n':>5} "
        f"{'AG bytes':>9} {'+scal':>6} {'ARx':>5} {'whole AG':>8} {'+wAG':>5} {'step ms':>8} "
        f"{'ratio':>6} {'IQR':>11}"
    )
    print(header)
    for r in rows:
        c = r["collectives"]
        print(
            f"{r['model']:9} {r['sharding']:5} {r['optimizer']:14} "
            f"{c['all-reduce']['count']:5d} {c['all-reduce']['bytes']:10d} "
            f"{c['all-gather']['count']:5d} {c['all-gather']['bytes']:9d} "
            f"{r['extra_scalar_all_reduces']:6d} {r['all_reduce_bytes_ratio']:5.2f} "
            f"{len(c['whole_param_all_gathers']):8d} {r['extra_whole_param_all_gathers']:5d} "
            f"{1e3 * r['median_step_s']:8.2f} {r['ratio_to_inner']:6.2f} "
            f"{r['ratio_iqr'][0]:5.2f}-{r['ratio_iqr'][1]:<5.2f}"
        )
    return result


if __name__ == "__main__":
    main()
