"""Helpers shared by the benchmarks: timing of optimizer steps (``cram_step.py``,
``acdc_step.py``), timing of models' inference forwards (``channel_multiple.py``,
``latency_model.py``), the machine record and atomic JSON output.

The benchmarks are scripts (``python experiments/benchmarks/<name>.py``): Python puts this
folder first on ``sys.path``, so they import this module, and ``spdy_oracle``, by name."""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from _results import machine_info, write_json
from flax import nnx

from jaxcompress import structure, train
from jaxcompress.models import SmallCNN, resnet8
from jaxcompress.spdy import time_callables

__all__ = [
    "Variant",
    "add_clock_flags",
    "benchmark_model",
    "clock_options",
    "copy_tree",
    "machine_info",
    "parse_step_args",
    "random_batch_setup",
    "report",
    "step_parser",
    "time_models",
    "time_variants",
    "write_json",
]


def report(benchmark: str, args, rows: dict, summary: dict, line) -> dict:
    """Print ``line(name, row)`` per row and the summary; write the result JSON to ``args.out``
    (with the config, the machine, the rows and the summary) and return it."""
    result = {
        "benchmark": benchmark,
        "config": vars(args),
        "machine": machine_info(),
        "rows": rows,
        "summary": summary,
    }
    for name, row in rows.items():
        print(line(name, row))
    print(json.dumps(summary, indent=1))
    write_json(args.out, result)
    return result


def benchmark_model(name: str, seed: int) -> nnx.Module:
    """The benchmarked model: ``"smallcnn"`` or ResNet-8, for 28x28x1 inputs and 10 classes."""
    rngs = nnx.Rngs(seed)
    if name == "smallcnn":
        return SmallCNN(1, 10, rngs=rngs)
    return resnet8(in_channels=1, num_classes=10, rngs=rngs)


def step_parser(doc: str) -> argparse.ArgumentParser:
    """The flags of the step-time benchmarks: ``--out``, ``--model``, ``--batch``,
    ``--repeats``, ``--steps``, ``--warmup`` (the description is ``doc``'s first paragraph)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--model", choices=("smallcnn", "resnet8"), default="smallcnn")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15, help="timed blocks (>= 10)")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=2, help="untimed blocks per variant")
    return parser


def parse_step_args(
    parser: argparse.ArgumentParser, argv=None, positive=("batch", "steps")
) -> argparse.Namespace:
    """Parse ``argv`` with a :func:`step_parser`; exit with a usage error unless
    ``--repeats >= 10`` and every flag in ``positive`` is ``>= 1``."""
    args = parser.parse_args(argv)
    if args.repeats < 10:
        parser.error(f"--repeats must be >= 10, got {args.repeats}")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def random_batch_setup(args):
    """The model (``args.model``, seed ``args.seed``) split for a train step and one random
    batch of ``args.batch`` 28x28x1 images: ``(graphdef, params, rest, x, y)``."""
    model = benchmark_model(args.model, args.seed)
    graphdef, params, rest = train.split_model(train.train_view(model))
    rng = np.random.default_rng(args.seed)
    x = jnp.asarray(rng.random((args.batch, 28, 28, 1), np.float32))
    y = jnp.asarray(rng.integers(0, 10, size=args.batch), jnp.int32)
    return graphdef, params, rest, x, y


def copy_tree(tree):
    """A fresh copy of every array (so donated buffers of one variant don't alias another's)."""
    return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


class Variant:
    """A jitted chained computation ``carry -> carry`` timed in blocks of ``steps`` calls."""

    def __init__(self, name: str, fn, carry):
        self.name, self.fn, self.carry = name, fn, carry
        self.times: list[float] = []  # wall-clock seconds per step
        self.cpu_times: list[float] = []  # process CPU seconds per step (all threads)

    def block(self, steps: int) -> None:
        start, cpu_start = time.perf_counter(), time.process_time()
        carry = self.carry
        for _ in range(steps):
            carry = self.fn(carry)
        jax.block_until_ready(carry)
        self.carry = carry
        self.times.append((time.perf_counter() - start) / steps)
        self.cpu_times.append((time.process_time() - cpu_start) / steps)


def time_variants(variants: list[Variant], *, warmup: int, steps: int, repeats: int) -> dict:
    """Compile and warm up every variant (``warmup`` blocks of ``steps`` calls, not kept), then
    time ``repeats`` blocks of each, interleaved so that load drift hits all alike; return the
    compile-and-warm-up seconds per variant name."""
    compile_s = {}
    for v in variants:
        start = time.perf_counter()
        for _ in range(warmup):
            v.block(steps)
        compile_s[v.name] = time.perf_counter() - start
        v.times.clear()
        v.cpu_times.clear()
    for _ in range(repeats):
        for v in variants:
            v.block(steps)
    return compile_s


def add_clock_flags(parser: argparse.ArgumentParser, *, clock: str) -> None:
    """The flags of :func:`time_models`: ``--repeats`` (rounds, default 25) and ``--clock``
    (``wall`` or ``cpu``, default ``clock``)."""
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default=clock,
        help="wall: multi-threaded executables on the wall clock; cpu: single-threaded ones on "
        "the process CPU clock (steadier on a shared machine)",
    )


def clock_options(clock: str) -> dict | None:
    """The XLA compiler options of ``--clock``: single-threaded executables for ``cpu`` (its
    process CPU time is then the time of one core), none for ``wall``."""
    return {"xla_cpu_multi_thread_eigen": False} if clock == "cpu" else None


def _forward(model: nnx.Module):
    view = nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)
    graphdef, state = nnx.split(view)
    return (lambda st, x: nnx.merge(graphdef, st)(x)), state


def time_models(
    models: dict, x, *, repeats: int, clock: str, compiler_options: dict | None = None
) -> tuple[dict, dict, dict]:
    """Time every model's inference forward (eval mode) on the batch ``x`` in one interleaved
    :func:`jaxcompress.spdy.time_callables` call (2 warm-up calls, ``repeats`` rounds,
    ``clock``, ``compiler_options``), so that load drift hits every model alike.

    Returns:
      ``(seconds, noise, macs)``, each keyed like ``models``: the median seconds of a call, the
      noise of the timing and the dense multiply-adds of one example
      (:func:`jaxcompress.structure.macs` on ``x[:1]``).
    """
    timings = time_callables(
        [(fn, (state, x)) for fn, state in map(_forward, models.values())],
        repeats=repeats,
        warmup=2,
        clock=clock,
        compiler_options=compiler_options,
    )
    seconds = {k: t.median for k, t in zip(models, timings, strict=True)}
    noise = {k: t.noise for k, t in zip(models, timings, strict=True)}
    macs = {k: int(structure.macs(m, x[:1]).dense) for k, m in models.items()}
    return seconds, noise, macs
