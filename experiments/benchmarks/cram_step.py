"""Step time of CrAM+ against its inner optimizer alone, on the same model and batch.

CrAM (Peste et al., ICLR 2023, arXiv:2207.14200) costs a second forward/backward pass per step
plus one mask computation on the perturbed weights, so its step should take about twice the
inner optimizer's. This script measures, on one device:

* ``inner``: the jitted train step of the inner optimizer alone
  (``jaxcompress.train.make_train_step(graphdef, inner)``);
* ``cram``: the same with ``cram(inner, ...)`` (``pass_grad_fn=True``);
* to see where the time goes, the mask alone (``mask``): ``jaxcompress.masks.magnitude`` on the
  params with a traced sparsity (or ``jaxcompress.masks.nm`` 2:4). CrAM's step is then about
  ``2 * inner + mask`` plus the elementwise perturbation and masking.

Each variant is compiled and warmed up, then timed in blocks of ``--steps`` chained steps (the
outputs fed back, donation on, one ``block_until_ready`` per block). Blocks of the variants are
interleaved, so slow drift of a shared machine affects all of them alike; the figure reported is
the median over ``--repeats`` blocks, per step. The ratio is ``cram / inner`` of those medians;
the JSON also gives the median of the ratios of adjacent (same-moment) blocks and, for CPU runs
on a shared host, the ratio of process CPU time, which contention does not inflate.

Model: ``SmallCNN`` (default widths, 93,738 params) or ResNet-8 from ``jaxcompress.models``, on
a Fashion-MNIST-shaped batch (28x28x1, 10 classes) of random pixels: the step time does not depend
on the values. Inner optimizer: SGD with momentum 0.9 and coupled weight decay 5e-4, as the
reference.

Usage::

    python experiments/benchmarks/cram_step.py --out results/cram_step.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

import _timing
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcompress import masks, train
from jaxcompress.optim import cram

TARGET_RATIO = 2.15


def _parse(argv=None) -> argparse.Namespace:
    parser = _timing.step_parser(__doc__)
    parser.add_argument("--compressor", choices=("global", "layer", "nm"), default="global")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    return _timing.parse_step_args(parser, argv)


def main(argv=None) -> dict:
    args = _parse(argv)
    graphdef, params, rest, x, y = _timing.random_batch_setup(args)

    inner = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    kwargs = {} if args.compressor == "nm" else {"sparsities": tuple(args.sparsities)}
    tx = cram(inner, rho=args.rho, compressor=args.compressor, seed=args.seed, **kwargs)

    def train_variant(name, opt, pass_grad_fn):
        step = train.make_train_step(graphdef, opt, pass_grad_fn=pass_grad_fn)
        carry = (
            _timing.copy_tree(params),
            _timing.copy_tree(rest),
            opt.init(_timing.copy_tree(params)),
        )

        def fn(c):
            p, r, s, _ = step(*c, x, y)
            return (p, r, s)

        return _timing.Variant(name, fn, carry)

    def mask_of(p, s):
        if args.compressor == "nm":
            return masks.nm(p, 2, 4)
        return masks.magnitude(p, s, scope=args.compressor)

    @jax.jit
    def mask_variant(c):
        p, s = c
        kept = sum(jnp.sum(m) for m in jax.tree.leaves(mask_of(p, s)))
        # A data dependency on the mask chains the blocks like the steps (s is unchanged).
        return p, s + 0.0 * kept.astype(s.dtype)

    mask_carry = (_timing.copy_tree(params), jnp.asarray(args.sparsities[0], jnp.float32))

    variants = [
        train_variant("inner", inner, False),
        train_variant("cram", tx, True),
        _timing.Variant("mask", mask_variant, mask_carry),
    ]
    compile_s = _timing.time_variants(
        variants, warmup=args.warmup, steps=args.steps, repeats=args.repeats
    )

    by_name = {v.name: v for v in variants}
    med = {v.name: statistics.median(v.times) for v in variants}
    ratio = med["cram"] / med["inner"]
    # Ratios of adjacent blocks share the machine's load at that moment (robust on a shared
    # host); CPU time counts the work done whatever the contention (meaningful on CPU only).
    paired = [c / i for c, i in zip(by_name["cram"].times, by_name["inner"].times, strict=True)]
    cpu_ratio = statistics.median(by_name["cram"].cpu_times) / statistics.median(
        by_name["inner"].cpu_times
    )
    num_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    num_pruned = sum(
        int(np.prod(a.shape))
        for p, a in jax.tree_util.tree_flatten_with_path(params)[0]
        if masks.prunable(p, a)
    )
    result = {
        "benchmark": "cram_step",
        "device": str(jax.devices()[0]),
        "device_kind": jax.devices()[0].device_kind,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "model": args.model,
        "num_params": num_params,
        "num_compressed_params": num_pruned,
        "batch": [args.batch, 28, 28, 1],
        "compressor": args.compressor,
        "sparsities": None if args.compressor == "nm" else list(args.sparsities),
        "rho": args.rho,
        "repeats": args.repeats,
        "steps_per_block": args.steps,
        "median_ms": {k: 1e3 * v for k, v in med.items()},
        "min_ms": {v.name: 1e3 * min(v.times) for v in variants},
        "median_cpu_ms": {v.name: 1e3 * statistics.median(v.cpu_times) for v in variants},
        "all_ms": {v.name: [1e3 * t for t in v.times] for v in variants},
        "warmup_and_compile_s": compile_s,
        "ratio_cram_over_inner": ratio,
        "ratio_min_cram_over_inner": min(by_name["cram"].times) / min(by_name["inner"].times),
        "ratio_median_of_paired_blocks": statistics.median(paired),
        "ratio_cpu_time": cpu_ratio,
        "mask_share_of_cram_step": med["mask"] / med["cram"],
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
    }
    _timing.write_json(args.out, result, indent=2)
    print(
        f"{args.model} batch {args.batch} on {result['device_kind']}: inner "
        f"{result['median_ms']['inner']:.2f} ms, CrAM+ {result['median_ms']['cram']:.2f} ms, "
        f"ratio {ratio:.3f} (paired {statistics.median(paired):.3f}, CPU time {cpu_ratio:.3f}; "
        f"target <= {TARGET_RATIO}); mask alone "
        f"{result['median_ms']['mask']:.2f} ms"
    )
    return result


if __name__ == "__main__":
    main()
