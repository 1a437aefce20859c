"""Helpers shared by the benchmarks: timing of optimizer steps (``cram_step.py``,
``acdc_step.py``), the machine record and atomic JSON output.

The benchmarks are scripts (``python experiments/benchmarks/<name>.py``): Python puts this
folder first on ``sys.path``, so they import this module, and ``spdy_oracle``, by name."""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcompress.checkpoint import write_json_atomic
from jaxcompress.models import SmallCNN, resnet8

__all__ = ["Variant", "benchmark_model", "copy_tree", "machine_info", "report", "write_json"]


def machine_info() -> dict:
    """Platform, first device, jax version, CPU count and load average, for a result JSON."""
    return {
        "platform": platform.platform(),
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "loadavg": os.getloadavg(),
    }


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


def write_json(path: str | None, result: dict, indent: int = 1) -> None:
    """Write ``result`` to ``path`` atomically (:func:`jaxcompress.checkpoint.write_json_atomic`),
    creating its folder; nothing when ``path`` is None."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_json_atomic(path, result, indent=indent)


def benchmark_model(name: str, seed: int) -> nnx.Module:
    """The benchmarked model: ``"smallcnn"`` or ResNet-8, for 28x28x1 inputs and 10 classes."""
    rngs = nnx.Rngs(seed)
    if name == "smallcnn":
        return SmallCNN(1, 10, rngs=rngs)
    return resnet8(in_channels=1, num_classes=10, rngs=rngs)


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
