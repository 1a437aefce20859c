"""Step time of AC/DC and GMP against their inner optimizer alone, on the same model and batch.

AC/DC (Peste et al., NeurIPS 2021, arXiv:2106.12379) and GMP (Zhu & Gupta 2017,
arXiv:1710.01878) add to a train step only elementwise masking (two selects on the gradients and
params, one on the updates), a scalar phase test on the step counter, and, on the rare steps that
start a compressed phase (or a GMP pruning step), one magnitude mask computation under
``lax.cond``. The target is a steady-state step within 5% of the inner optimizer's.

Variants, each a full jitted train step (forward, backward, update;
``jaxcompress.train.make_train_step``) on one device:

* ``inner``: the inner optimizer alone (SGD, momentum 0.9, coupled weight decay 5e-4, as the
  reference CIFAR recipes);
* ``acdc_compressed`` / ``acdc_decompressed``: ``acdc(inner)`` held inside a compressed
  (resp. decompressed) phase of a long schedule: the common step;
* ``acdc_boundary``: every step is the last one before a compressed phase, so every step
  computes a new mask (the counter is reset before each step): the rare step;
* ``gmp_steady``: ``gmp(inner)`` between pruning steps; ``gmp_prune``: every step computes the
  next mask (a pruning step).

Each variant is compiled and warmed up, then timed in blocks of ``--steps`` chained steps
(outputs fed back, donation on, one ``block_until_ready`` per block). Blocks of the variants are
interleaved so that drift on a shared machine hits all alike; reported per variant: the median
over ``--repeats`` blocks (per step), its ratio to ``inner``, the median ratio of same-moment
blocks, and on CPU the ratio of process CPU time (which contention does not inflate). The
amortised AC/DC cost for a phase of ``--phase-steps`` steps adds the boundary surcharge once
per phase.

Usage::

    python experiments/benchmarks/acdc_step.py --out results/acdc_step.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

import jax
import jax.numpy as jnp
import optax
from _timing import (
    Variant,
    copy_tree,
    parse_step_args,
    random_batch_setup,
    step_parser,
    time_variants,
    write_json,
)

from jaxcompress import masks, train
from jaxcompress.optim import acdc, acdc_schedule, gmp

TARGET_RATIO = 1.05
# Long phases so that a variant stays in its phase for the whole benchmark.
_PHASE = 1_000_000
SCHEDULE = acdc_schedule(
    warmup_steps=_PHASE,
    compressed_steps=_PHASE,
    decompressed_steps=_PHASE,
    final_compressed_steps=_PHASE,
    total_steps=4 * _PHASE,
)


def _parse(argv=None) -> argparse.Namespace:
    parser = step_parser(__doc__)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--scope", choices=("global", "layer"), default="global")
    parser.add_argument(
        "--phase-steps", type=int, default=7800, help="phase length for the amortised cost"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parse_step_args(parser, argv, positive=("batch", "steps", "phase_steps"))
    if not 0.0 <= args.sparsity < 1.0:
        parser.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    return args


def main(argv=None) -> dict:
    args = _parse(argv)
    graphdef, params, rest, x, y = random_batch_setup(args)
    sparse_masks = masks.magnitude(params, args.sparsity, scope=args.scope)

    inner = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    acdc_tx = acdc(inner, sparsity=args.sparsity, schedule=SCHEDULE, scope=args.scope)
    gmp_tx = gmp(
        inner,
        sparsity=args.sparsity,
        begin_step=_PHASE,
        end_step=2 * _PHASE,
        every=_PHASE // 4,
        scope=args.scope,
    )

    def variant(name, opt, count=None, reset_count=False):
        step = train.make_train_step(graphdef, opt)
        state = opt.init(copy_tree(params))
        if count is not None:
            state = state._replace(count=jnp.int32(count), masks=copy_tree(sparse_masks))
        carry = (copy_tree(params), copy_tree(rest), state)

        def fn(c):
            p, r, s = c
            if reset_count:  # stay on the step before a mask update
                s = s._replace(count=jnp.int32(count))
            p, r, s, _ = step(p, r, s, x, y)
            return (p, r, s)

        return Variant(name, fn, carry)

    first_c = SCHEDULE.warmup_steps
    first_d = first_c + SCHEDULE.compressed_steps
    second_c = first_d + SCHEDULE.decompressed_steps
    variants = [
        variant("inner", inner),
        variant("acdc_compressed", acdc_tx, count=first_c + 10),
        variant("acdc_decompressed", acdc_tx, count=first_d + 10),
        variant("acdc_boundary", acdc_tx, count=second_c - 1, reset_count=True),
        variant("gmp_steady", gmp_tx, count=_PHASE + 10),
        variant("gmp_prune", gmp_tx, count=_PHASE + _PHASE // 4 - 1, reset_count=True),
    ]
    compile_s = time_variants(variants, warmup=args.warmup, steps=args.steps, repeats=args.repeats)

    base = variants[0]
    med = {v.name: statistics.median(v.times) for v in variants}
    cpu_med = {v.name: statistics.median(v.cpu_times) for v in variants}
    ratios = {
        v.name: {
            "ratio_of_medians": med[v.name] / med["inner"],
            "median_of_block_ratios": statistics.median(
                a / b for a, b in zip(v.times, base.times, strict=True)
            ),
            "cpu_time_ratio": cpu_med[v.name] / cpu_med["inner"],
        }
        for v in variants[1:]
    }
    steady = max(med["acdc_compressed"], med["acdc_decompressed"])
    surcharge = med["acdc_boundary"] - med["acdc_compressed"]
    amortised = (steady + surcharge / args.phase_steps) / med["inner"]
    result = {
        "benchmark": "acdc_step",
        "model": args.model,
        "num_params": int(sum(p.size for p in jax.tree.leaves(params))),
        "batch": args.batch,
        "sparsity": args.sparsity,
        "scope": args.scope,
        "inner": "chain(add_decayed_weights(5e-4), sgd(0.1, momentum=0.9))",
        "repeats": args.repeats,
        "steps_per_block": args.steps,
        "median_step_s": med,
        "median_cpu_step_s": cpu_med,
        "ratios_to_inner": ratios,
        "acdc_amortised_ratio": amortised,
        "phase_steps_for_amortised": args.phase_steps,
        "target_ratio": TARGET_RATIO,
        "meets_target": bool(
            max(
                ratios["acdc_compressed"]["ratio_of_medians"],
                ratios["acdc_decompressed"]["ratio_of_medians"],
            )
            <= TARGET_RATIO
        ),
        "compile_and_warmup_s": compile_s,
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
    }
    write_json(args.out, result, indent=2)
    for name in med:
        extra = ""
        if name in ratios:
            r = ratios[name]
            extra = (
                f"  x{r['ratio_of_medians']:.3f} (blocks x{r['median_of_block_ratios']:.3f}, "
                f"cpu x{r['cpu_time_ratio']:.3f})"
            )
        print(f"{name:>18}: {1e3 * med[name]:8.2f} ms/step{extra}")
    print(f"acdc amortised over {args.phase_steps}-step phases: x{amortised:.3f}")
    return result


if __name__ == "__main__":
    main()
