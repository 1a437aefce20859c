"""Timing helpers shared by the optimizer step benchmarks (``cram_step.py``, ``acdc_step.py``)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcompress.models import SmallCNN, resnet8

__all__ = ["Variant", "benchmark_model", "copy_tree"]


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
