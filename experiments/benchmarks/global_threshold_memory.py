"""Per-device memory and time of the global magnitude threshold on sharded params.

``jaxcompress.masks.magnitude(params, s, scope="global")`` finds the global Top-K threshold
by bisection on the float32 bit pattern of ``|w|``, with counts reduced by ``jnp.sum`` (a
local reduction plus a scalar all-reduce under SPMD), so no device ever holds more than its
own shard. The obvious alternative, used by the reference CrAM/AC-DC code on one GPU,
concatenates every ``|w|`` and sorts (or ``top_k``s) it: under ``jit`` with sharded params
XLA must all-gather the whole model onto every device first.

This script builds a model-sized tree of conv/dense kernels (ResNet-50-like shapes, about
25M params by default), shards every kernel over ``--devices`` emulated CPU devices along its
output (or input) axis, and for both methods reports

* the compiled executable's per-device ``memory_analysis()``: argument, output, temp bytes;
* the median wall time over ``--repeats`` calls (after one warm-up), traced sparsity 0.9
  (``--naive-repeats`` for the baseline, whose sort is slow on emulated CPU devices).

It also reports how many weights each keeps: the library keeps exactly the float32 count
``expected_kept_float32``; the baseline keeps ``|w| >= thr`` (all ties at the threshold).

Usage::

    python experiments/benchmarks/global_threshold_memory.py --out results/global_threshold.json
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=8, help="emulated CPU devices")
    parser.add_argument("--scale", type=float, default=1.0, help="width multiplier (1.0 ~ 25M)")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--naive-repeats",
        type=int,
        default=None,
        help="timed calls of the (slow) baseline; default --repeats",
    )
    parser.add_argument("--out", type=str, default=None, help="write the results as JSON here")
    return parser.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:  # must happen before JAX initialises its backends
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={ARGS.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _timing import write_json  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxcompress.masks as jm  # noqa: E402
from jaxcompress.masks._magnitude import keep_count_array  # noqa: E402


def resnet50_like_shapes(scale: float) -> dict[str, tuple[int, ...]]:
    """Kernel shapes of a ResNet-50-like network (Flax layout), widths times ``scale``."""

    def c(x: int) -> int:
        return max(8, int(round(x * scale / 8)) * 8)

    shapes = {"stem/kernel": (7, 7, 3, c(64))}
    cin = c(64)
    for stage, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)]):
        w, out = c(width), c(4 * width)
        for b in range(blocks):
            name = f"stage{stage}/block{b}"
            shapes[f"{name}/conv1/kernel"] = (1, 1, cin, w)
            shapes[f"{name}/conv2/kernel"] = (3, 3, w, w)
            shapes[f"{name}/conv3/kernel"] = (1, 1, w, out)
            if b == 0:
                shapes[f"{name}/shortcut/kernel"] = (1, 1, cin, out)
            cin = out
    shapes["fc/kernel"] = (cin, 1000)
    return shapes


def make_params(shapes, mesh, devices):
    """Random sharded params: each kernel split over the last axis (else axis -2) divisible."""
    params, key = {}, jax.random.key(0)
    for name, shape in shapes.items():
        axis = len(shape) - 1 if shape[-1] % devices == 0 else len(shape) - 2
        spec = [None] * len(shape)
        spec[axis] = "d"
        sharding = NamedSharding(mesh, P(*spec))
        key, sub = jax.random.split(key)
        init = jax.jit(lambda k, s=shape: jax.random.normal(k, s), out_shardings=sharding)
        params[name] = init(sub)
    return params


def naive_global(params, sparsity):
    """Concatenate every |w|, sort, threshold (gathers the model on every device)."""
    flat = jnp.concatenate([jnp.abs(x).reshape(-1) for x in params.values()])
    n = flat.size
    k = jnp.int32(n) - jnp.floor(n * sparsity).astype(jnp.int32)
    thr = jnp.sort(flat)[n - jnp.maximum(k, 1)]
    return {name: jnp.abs(x) >= thr for name, x in params.items()}


def shard_local_global(params, sparsity):
    return jm.magnitude(params, sparsity, scope="global", where=lambda p, x: True)


def measure(fn, params, sparsity, repeats):
    jitted = jax.jit(fn)
    t0 = time.perf_counter()
    compiled = jitted.lower(params, sparsity).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    out = jax.block_until_ready(compiled(params, sparsity))  # warm-up
    kept = int(sum(int(jnp.sum(m)) for m in jax.tree.leaves(out)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, sparsity))
        times.append(time.perf_counter() - t0)
    return {
        "argument_bytes_per_device": int(mem.argument_size_in_bytes),
        "output_bytes_per_device": int(mem.output_size_in_bytes),
        "temp_bytes_per_device": int(mem.temp_size_in_bytes),
        "all_gather_in_hlo": "all-gather" in compiled.as_text(),
        "compile_s": compile_s,
        "median_s": statistics.median(times),
        "times_s": times,
        "kept": kept,
    }


def main(args: argparse.Namespace) -> dict:
    devices = jax.device_count()
    if devices < args.devices:
        sys.exit(f"expected {args.devices} devices, JAX sees {devices}: set XLA_FLAGS first")
    mesh = jax.make_mesh((args.devices,), ("d",), axis_types=(AxisType.Auto,))
    shapes = resnet50_like_shapes(args.scale)
    params = make_params(shapes, mesh, args.devices)
    n = sum(int(np.prod(s)) for s in shapes.values())
    sparsity = jnp.float32(args.sparsity)
    results = {
        "params": n,
        "leaves": len(shapes),
        "devices": args.devices,
        "sparsity": args.sparsity,
        "repeats": args.repeats,
        "expected_kept_python_float": jm.keep_count(n, args.sparsity),
        "expected_kept_float32": int(keep_count_array(n, sparsity)),
        "platform": f"{platform.platform()} / jax {jax.__version__} / {jax.devices()[0].platform}",
        "shard_local": measure(shard_local_global, params, sparsity, args.repeats),
        "naive_concat_sort": measure(
            naive_global, params, sparsity, args.naive_repeats or args.repeats
        ),
    }
    loc, nai = results["shard_local"], results["naive_concat_sort"]
    results["temp_ratio_naive_over_local"] = nai["temp_bytes_per_device"] / max(
        loc["temp_bytes_per_device"], 1
    )
    print(f"{n:,} params in {len(shapes)} kernels over {args.devices} devices, s={args.sparsity}")
    print(
        f"{'method':<18}{'arg MiB':>10}{'out MiB':>10}{'temp MiB':>10}{'median s':>10}{'kept':>12}"
    )
    for name, r in (("shard_local", loc), ("naive_concat_sort", nai)):
        mib = [r[f"{k}_bytes_per_device"] / 2**20 for k in ("argument", "output", "temp")]
        print(
            f"{name:<18}{mib[0]:>10.1f}{mib[1]:>10.1f}{mib[2]:>10.1f}"
            f"{r['median_s']:>10.3f}{r['kept']:>12,}"
        )
    print(
        f"expected kept: {results['expected_kept_float32']:,} (float32 sparsity), "
        f"{results['expected_kept_python_float']:,} (Python float)"
    )
    print(f"temp ratio naive/shard-local: {results['temp_ratio_naive_over_local']:.1f}x")
    if args.out:
        write_json(args.out, results, indent=2)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main(ARGS)
