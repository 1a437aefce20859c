"""Training loops shared by the sparse-optimizer tests (AC/DC, GMP): the inner optimizers every
transform is run with, AC/DC schedules from phase lengths, and a jitted loop that records each
step.

Import as ``from _optim_loops import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcompress.optim import AcdcSchedule, acdc_schedule

INNERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "sgd": lambda: optax.sgd(0.05),
    "momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "adamw": lambda: optax.adamw(0.01, weight_decay=0.1),
}


def dense_out_params(rng: np.random.Generator) -> dict:
    """Params of a two-layer model drawn from ``rng``: ``dense`` (kernel ``(16, 8)``, bias
    ``(8,)``) and a bias-free ``out`` (kernel ``(8, 4)``, scaled by 0.5), float32."""
    return {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(8,)), jnp.float32),
        },
        "out": {"kernel": jnp.asarray(rng.normal(size=(8, 4)) * 0.5, jnp.float32)},
    }


def acdc_steps(
    warmup: int, compressed: Any, decompressed: int, final: int, total: int
) -> AcdcSchedule:
    """``acdc_schedule`` with its five phase lengths in steps, in timeline order: dense
    ``warmup``, cycles of ``compressed`` + ``decompressed``, the last ``final`` steps
    compressed, ``total`` steps in all. ``compressed`` is passed on unchecked (a test of the
    type check may give a float)."""
    return acdc_schedule(
        warmup_steps=warmup,
        compressed_steps=compressed,
        decompressed_steps=decompressed,
        final_compressed_steps=final,
        total_steps=total,
    )


def make_step(tx: optax.GradientTransformation, loss: Callable, traces: list | None = None):
    """A jitted ``(params, state) -> (params, state, grads)`` full-batch step of ``loss``;
    appends to ``traces`` each time it is traced."""

    @jax.jit
    def step(params, state):
        if traces is not None:
            traces.append(1)
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, grads

    return step


def run_steps(
    tx: optax.GradientTransformation,
    params: Any,
    loss: Callable,
    num_steps: int,
    traces: list | None = None,
) -> list[tuple[Any, Any, Any]]:
    """``num_steps`` steps from ``tx.init(params)``: ``[(params, state, grads), ...]``, entry
    ``t`` holding the params and state entering step ``t`` and the gradients of step ``t - 1``
    (``None`` at ``t = 0``)."""
    step = make_step(tx, loss, traces)
    state = tx.init(params)
    history = [(params, state, None)]
    for _ in range(num_steps):
        params, state, grads = step(params, state)
        history.append((params, state, grads))
    return history
