"""A functional, Flax-free re-statement of :class:`jaxcompress.models.SmallCNN` in eval mode.

SPDY's reconstruction (:mod:`jaxcompress.spdy`) needs every compressible layer's *input* in
the dense and in the compressed model, differentiably in the params. For the BatchNorm
SmallCNN this module re-implements the eval-mode forward over pure-dict params
(``nnx.to_pure_dict(nnx.state(model, nnx.Param))``) and running statistics, and returns those
inputs ("taps") beside the logits. ``tests/test_experiment_spdy.py`` checks that the logits
equal ``model(x)`` in eval mode.

Per block ``i``: ``a_i = relu(BN(conv(h_i, K_i)))``, then 2x2 max pooling where the model
pools; the head is global average pooling and a Dense layer.

**Channel units.** Dropping output channel ``c`` of block ``a`` removes work in block ``a``
(its conv, BN, ReLU and pooling) *and* in its consumer (block ``a + 1``'s conv reads one input
channel fewer; for the last block, the head reads one feature fewer). A per-layer timing table
can only be additive if an option changes nothing outside its entry, so a structured option
here is the width of a *unit*: the channels between a producer block ``a`` and its consumer.
:func:`units` pairs the blocks from the end (``a = n-1, n-3, ...``: the last block with the
head, then ``(n-3, n-2)``, ...), so no conv is both a pruned producer and a pruned consumer and
the units are independent. The unit's compressed tensor is the consumer's kernel: masking its
*input* channels (axis ``-2``) is exactly removing the producer's channels, which
:func:`slice_units` does physically; the masked model needs no gating.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcompress.models._common import BN_EPSILON


@dataclasses.dataclass(frozen=True)
class Arch:
    """Static shape of a SmallCNN: per-block stride and pooling."""

    strides: tuple[int, ...]
    pool_after: tuple[bool, ...]

    @classmethod
    def of(cls, model: Any) -> Arch:
        return cls(tuple(model.strides), tuple(model.pool_after))

    @property
    def depth(self) -> int:
        return len(self.strides)

    def names(self, *, head: bool = True) -> tuple[str, ...]:
        convs = tuple(f"blocks/{i}/conv/kernel" for i in range(self.depth))
        return (*convs, "head/kernel") if head else convs


@dataclasses.dataclass(frozen=True)
class Unit:
    """Channels between producer block ``producer`` and the layer ``consumer`` (a kernel name)
    that reads them; ``name`` (the consumer's kernel) is the unit's name in tables/databases."""

    producer: int
    consumer: str

    @property
    def name(self) -> str:
        return self.consumer

    @property
    def consumer_block(self) -> int | None:
        return None if self.consumer == "head/kernel" else self.producer + 1


def units(arch: Arch) -> tuple[Unit, ...]:
    """Independent channel units in model order (module docstring): producers ``n-1, n-3,
    ...``; block ``n-1`` feeds the head, block ``a < n-1`` feeds block ``a + 1``."""
    out = []
    for a in range(arch.depth - 1, -1, -2):
        consumer = "head/kernel" if a == arch.depth - 1 else f"blocks/{a + 1}/conv/kernel"
        out.append(Unit(a, consumer))
    return tuple(reversed(out))


def conv(kernel: jax.Array, x: jax.Array, *, stride: int) -> jax.Array:
    """``nnx.Conv`` (SAME padding, no bias, NHWC / HWIO) as a pure function."""
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def conv_s1(kernel: jax.Array, x: jax.Array) -> jax.Array:
    return conv(kernel, x, stride=1)


def conv_s2(kernel: jax.Array, x: jax.Array) -> jax.Array:
    return conv(kernel, x, stride=2)


def dense(kernel: jax.Array, x: jax.Array) -> jax.Array:
    return x @ kernel


def layer_fns(arch: Arch, *, head: bool = True) -> dict[str, Any]:
    """``name -> (kernel, x) -> y`` for every compressible layer (module-level functions, so
    jitted reconstruction compiles once per shape)."""
    by_stride = {1: conv_s1, 2: conv_s2}
    out = {}
    for i, s in enumerate(arch.strides):
        out[f"blocks/{i}/conv/kernel"] = by_stride.get(s) or functools.partial(conv, stride=s)
    if head:
        out["head/kernel"] = dense
    return out


def split(model: Any) -> tuple[dict, dict]:
    """``(params, stats)`` as pure dicts."""
    return (
        nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
    )


def block(
    kernel: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    x: jax.Array,
    *,
    stride: int,
    pool: bool,
) -> jax.Array:
    """One eval-mode block: ``maxpool?(relu(BN(conv(x, kernel))))``."""
    z = conv(kernel, x, stride=stride)
    z = (z - mean) * jax.lax.rsqrt(var + BN_EPSILON)
    h = jax.nn.relu(z * scale + bias)
    if pool:
        h = nnx.max_pool(h, (2, 2), strides=(2, 2), padding="SAME")
    return h


def _block_args(params: dict, stats: dict, i: int) -> tuple:
    blk, st = params["blocks"][i], stats["blocks"][i]
    return (
        blk["conv"]["kernel"],
        blk["bn"]["scale"],
        blk["bn"]["bias"],
        st["bn"]["mean"],
        st["bn"]["var"],
    )


def forward(
    arch: Arch, params: dict, stats: dict, x: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Eval-mode logits and the input of every conv/dense layer (``{name: input}``)."""
    taps = {}
    h = x
    for i, (s, pool) in enumerate(zip(arch.strides, arch.pool_after, strict=True)):
        taps[f"blocks/{i}/conv/kernel"] = h
        h = block(*_block_args(params, stats, i), h, stride=s, pool=pool)
    feat = jnp.mean(h, axis=(1, 2))
    taps["head/kernel"] = feat
    return feat @ params["head"]["kernel"] + params["head"]["bias"], taps


def unit_fn(arch: Arch, unit: Unit):
    """``(producer block args..., consumer kernel, x) -> consumer output without its own
    normalisation``: the computation whose time is the unit's table entry."""
    a = unit.producer
    stride, pool = arch.strides[a], arch.pool_after[a]
    consumer_stride = None if unit.consumer_block is None else arch.strides[a + 1]

    def fn(kernel, scale, bias, mean, var, consumer_kernel, x):
        h = block(kernel, scale, bias, mean, var, x, stride=stride, pool=pool)
        if consumer_stride is None:
            return jnp.mean(h, axis=(1, 2)) @ consumer_kernel
        return conv(consumer_kernel, h, stride=consumer_stride)

    return fn


def unit_args(params: dict, stats: dict, unit: Unit, x: jax.Array, keep: int) -> tuple:
    """Arguments of :func:`unit_fn` with the first ``keep`` channels of the unit."""
    args = [np.asarray(a) for a in _block_args(params, stats, unit.producer)]
    args[0] = args[0][..., :keep]
    args[1:] = [a[:keep] for a in args[1:]]
    if unit.consumer_block is None:
        ck = np.asarray(params["head"]["kernel"])[:keep, :]
    else:
        ck = np.asarray(params["blocks"][unit.consumer_block]["conv"]["kernel"])[:, :, :keep, :]
    return (*(jnp.asarray(a) for a in args), jnp.asarray(ck), x)


def _leaf(tree: dict, name: str):
    node = tree
    for part in name.split("/"):
        node = node[int(part)] if part.isdigit() else node[part]
    return node


def slice_units(arch: Arch, params: dict, stats: dict) -> tuple[dict, dict]:
    """Physically drop every unit channel whose consumer input weights are all zero: the
    producer's conv output channel, its BN entries and the consumer's input channel. Returns
    smaller ``(params, stats)`` computing the same function as the masked model."""
    params = jax.tree.map(np.asarray, params)
    stats = jax.tree.map(np.asarray, stats)
    for u in units(arch):
        ck = _leaf(params, u.consumer)
        other = tuple(i for i in range(ck.ndim) if i != ck.ndim - 2)
        keep = np.flatnonzero(np.any(ck != 0, axis=other))
        blk, st = params["blocks"][u.producer], stats["blocks"][u.producer]
        blk["conv"]["kernel"] = blk["conv"]["kernel"][..., keep]
        blk["bn"] = {n: v[keep] for n, v in blk["bn"].items()}
        st["bn"] = {n: v[keep] for n, v in st["bn"].items()}
        if u.consumer_block is None:
            params["head"]["kernel"] = ck[keep, :]
        else:
            params["blocks"][u.consumer_block]["conv"]["kernel"] = ck[:, :, keep, :]
    return params, stats


def narrow(arch: Arch, params: dict, stats: dict, keep: dict[str, int]) -> tuple[dict, dict]:
    """The model with unit ``name`` cut to its first ``keep[name]`` channels (other units
    unchanged): the same shapes as :func:`slice_units` gives for that width, for timing."""
    params = jax.tree.map(np.asarray, params)
    stats = jax.tree.map(np.asarray, stats)
    by_name = {u.name: u for u in units(arch)}
    for name, k in keep.items():
        u = by_name[name]
        blk, st = params["blocks"][u.producer], stats["blocks"][u.producer]
        blk["conv"]["kernel"] = blk["conv"]["kernel"][..., :k]
        blk["bn"] = {n: v[:k] for n, v in blk["bn"].items()}
        st["bn"] = {n: v[:k] for n, v in st["bn"].items()}
        if u.consumer_block is None:
            params["head"]["kernel"] = params["head"]["kernel"][:k, :]
        else:
            ck = params["blocks"][u.consumer_block]["conv"]["kernel"]
            params["blocks"][u.consumer_block]["conv"]["kernel"] = ck[:, :, :k, :]
    return params, stats
