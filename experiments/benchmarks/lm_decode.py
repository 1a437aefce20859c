"""Benchmark: greedy decoding of a 2:4-sparse GPT, dense against packed, with and without the
key/value cache.

    python experiments/benchmarks/lm_decode.py --out out/lm_decode [--quick]

It builds a :class:`jaxcompress.models.GPT` (GPT-2 initialisation, random weights: the time of
a decode step does not depend on what the weights learned), masks every block kernel 2:4
along its input axis by magnitude (``nm_mask``), converts a copy with
``sparsify_for_inference`` and, per batch size, times ``generate`` of ``--steps`` tokens after
a ``--prompt-len`` prompt (greedy, ``temperature=0``):

- ``dense_window``: the masked dense model, ``use_cache=False`` (the window is recomputed at
  every step, as nanoGPT does);
- ``dense_cached``: the masked dense model with the key/value cache (one row per sequence and
  weight per step: the memory-bound regime the N:M kernel is for);
- ``packed_cached``: the converted model with the cache; its layers call ``nm_linear``, which
  takes the Mosaic GPU kernel only where the policy table measured it faster, else unpacks
  the weight and runs ``jnp.dot`` (always, on a CPU);
- ``packed_for_batch``: ``sparsify_for_inference(model, batch=B)``: only the layers whose
  dispatch at batch ``B`` takes the kernel are converted, the rest stay dense (on a CPU or an
  unmeasured GPU: the dense model itself);
- ``packed_mosaic``: the converted model forced onto the kernel (sm90 GPUs only); the
  kernel takes at most 64 rows, so the prefill's ``batch x prompt_len`` rows must fit
  (``gpu_checks.sh`` passes ``--prompt-len 4``); a batch where they do not is recorded as a
  failure of that variant.

Per row: milliseconds per generated token (median over ``--reps`` timed ``generate`` calls,
each including its prefill, divided by ``--steps``), tokens per second over the batch, the
speedup over ``dense_cached`` and over ``dense_window``, and the agreement of the generated
tokens with ``dense_cached``'s (``first_divergence``: the first generated position that
differs, or ``None``; a float rounding difference can flip a near-tie in ``bfloat16``). The
result JSON (``--out``/results.json) also holds the model, the bytes of its block kernels
dense and packed, the machine and the versions.

Defaults: on an sm90 GPU a 4-block GPT of width 4096 (MLP 16384, 32 heads, bfloat16;
kernels 4096x4096, 4096x16384 and 16384x4096), batches 1 and 16; elsewhere width 512 (MLP
2048, float32), batches 1 and 8. The context is ``--prompt-len + --steps`` so that every step
is cached.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from _results import machine_info, package_versions, write_json
from flax import nnx

from jaxcompress.kernels import nm_mask, sparsify_for_inference
from jaxcompress.kernels._common import is_hopper
from jaxcompress.kernels._nm_matmul.config import MAX_BATCH
from jaxcompress.models import GPT, generate

VARIANTS = ("dense_window", "dense_cached", "packed_cached", "packed_for_batch", "packed_mosaic")


def _parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--out", default="out/lm_decode", help="output folder")
    p.add_argument("--quick", action="store_true", help="a small model and few steps")
    p.add_argument("--width", type=int, help="d_model (GPU 4096, CPU 512)")
    p.add_argument("--mlp", type=int, help="MLP width (default 4 x width)")
    p.add_argument("--heads", type=int, help="attention heads (default width // 128, >= 1)")
    p.add_argument("--layers", type=int, default=4, help="decoder blocks")
    p.add_argument("--vocab", type=int, default=256, help="vocabulary size")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=96, help="generated tokens per call")
    p.add_argument("--batches", nargs="+", type=int, help="batch sizes (GPU 1 16, CPU 1 8)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--reps", type=int, default=5, help="timed generate calls (median)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = p.parse_args(argv)
    for name in ("width", "mlp", "heads", "layers", "vocab", "prompt_len", "steps", "reps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.batches is not None and min(args.batches) < 1:
        p.error(f"--batches must be >= 1, got {args.batches}")
    return args


def _defaults(args, on_gpu: bool) -> None:
    if args.quick:
        args.width = args.width or 128
        args.steps = min(args.steps, 16)
        args.prompt_len = min(args.prompt_len, 8)
        args.reps = min(args.reps, 3)
        args.layers = min(args.layers, 2)
    args.width = args.width or (4096 if on_gpu else 512)
    args.mlp = args.mlp or 4 * args.width
    args.heads = args.heads or max(1, args.width // 128)
    args.batches = args.batches or ([1, 16] if on_gpu else [1, 8])
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")


def _nm_gpt(args) -> GPT:
    """The GPT in ``args.dtype`` with every block kernel 2:4 along its input axis."""
    model = GPT(
        args.vocab,
        context=args.prompt_len + args.steps,
        d_model=args.width,
        num_heads=args.heads,
        num_layers=args.layers,
        mlp_dim=args.mlp,
        rngs=nnx.Rngs(0),
    )
    dtype = jnp.dtype(args.dtype)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), params))
    for _, layer in nnx.iter_graph(model):
        if isinstance(layer, nnx.Linear):
            kernel = layer.kernel[...]
            layer.kernel[...] = kernel * nm_mask(kernel, 2, 4).astype(kernel.dtype)
    return model


def _time_generate(model, prompt, steps: int, reps: int, use_cache: bool, cache_dtype):
    """``(tokens, seconds per call)``: the median of ``reps`` timed calls after a compile."""
    key = jax.random.key(0)

    def call():
        out = generate(model, prompt, steps, key, 0.0, use_cache=use_cache, cache_dtype=cache_dtype)
        return jax.block_until_ready(out)

    tokens = call()  # compile
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return np.asarray(tokens), statistics.median(times)


def _first_divergence(tokens: np.ndarray, ref: np.ndarray, prompt_len: int) -> int | None:
    differs = np.nonzero((tokens != ref).any(axis=0))[0]
    return None if differs.size == 0 else int(differs[0]) - prompt_len


def main(argv=None) -> int:
    args = _parse_args(argv)
    on_gpu = is_hopper()
    _defaults(args, on_gpu)
    dtype = jnp.dtype(args.dtype)
    variants = [v for v in args.variants if v != "packed_mosaic" or on_gpu]
    dense = _nm_gpt(args)
    packed, report = sparsify_for_inference(dense)
    models = {
        "dense_window": (dense, False),
        "dense_cached": (dense, True),
        "packed_cached": (packed, True),
    }
    if "packed_mosaic" in variants:
        models["packed_mosaic"] = (sparsify_for_inference(dense, implementation="mosaic")[0], True)
    result = {
        "benchmark": "lm_decode",
        "config": vars(args),
        "machine": machine_info(),
        "versions": package_versions(("jax", "jaxlib", "flax", "numpy")),
        "model": {
            "kernels": len(report.layers),
            "kernel_shapes": sorted({r.shape for r in report.layers}),
            "dense_kernel_bytes": report.dense_bytes,
            "packed_kernel_bytes": report.packed_bytes,
            "model_bytes_dense": report.model_bytes_before,
            "model_bytes_packed": report.model_bytes_after,
        },
        "note": None
        if on_gpu
        else "no sm90 GPU: packed_cached runs the dense path (unpack + jnp.dot per call)",
        "policy": os.environ.get("JAXCOMPRESS_NM_POLICY") or "shipped nm_policy.json",
        "rows": [],
        "failures": [],
    }
    print(f"GPT width {args.width}, MLP {args.mlp}, {args.layers} blocks, {args.dtype}")
    print(report)
    rng = np.random.default_rng(0)
    for batch in args.batches:
        prompt = jnp.asarray(rng.integers(0, args.vocab, (batch, args.prompt_len)), jnp.int32)
        times, tokens = {}, {}
        if "packed_for_batch" in variants:
            chosen, chosen_report = sparsify_for_inference(dense, batch=batch)
            models["packed_for_batch"] = (chosen, True)
            packed_layers = sum(r.status == "packed" for r in chosen_report.layers)
            result.setdefault("packed_for_batch_layers", {})[str(batch)] = packed_layers
            print(
                f"batch {batch}: sparsify_for_inference(batch={batch}) packs {packed_layers} "
                f"of {len(chosen_report.layers)} kernels"
            )
        for name in variants:
            model, use_cache = models[name]
            if name == "packed_mosaic" and batch * args.prompt_len > MAX_BATCH:
                error = (
                    f"the prefill has batch x prompt_len = {batch * args.prompt_len} rows, more "
                    f"than the kernel's {MAX_BATCH}: pass a shorter --prompt-len"
                )
                result["failures"].append({"variant": name, "batch": batch, "error": error})
                print(f"{name} batch {batch}: skipped: {error}", file=sys.stderr)
                continue
            try:
                tokens[name], times[name] = _time_generate(
                    model, prompt, args.steps, args.reps, use_cache, dtype
                )
            except Exception as e:  # a variant that fails is recorded, the others still run
                result["failures"].append(
                    {"variant": name, "batch": batch, "error": f"{type(e).__name__}: {e}"}
                )
                print(f"{name} batch {batch}: FAILED {type(e).__name__}: {e}", file=sys.stderr)
        for name in times:
            row = {
                "variant": name,
                "batch": batch,
                "ms_per_token": 1e3 * times[name] / args.steps,
                "tokens_per_s": batch * args.steps / times[name],
            }
            for base in ("dense_cached", "dense_window"):
                if base in times:
                    row[f"speedup_vs_{base}"] = times[base] / times[name]
            if "dense_cached" in tokens:
                row["first_divergence"] = _first_divergence(
                    tokens[name], tokens["dense_cached"], args.prompt_len
                )
            result["rows"].append(row)
            print(
                f"batch {batch:3d} {name:16s} {row['ms_per_token']:9.3f} ms/token "
                f"{row['tokens_per_s']:10.1f} tok/s  x{row.get('speedup_vs_dense_cached', 0):.2f} "
                f"vs dense_cached  first divergence {row.get('first_divergence')}"
            )
        write_json(os.path.join(args.out, "results.json"), result)
    print(json.dumps(result["model"], indent=1))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
