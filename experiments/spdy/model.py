"""A functional, Flax-free re-statement of :class:`jaxcompress.models.SmallCNN` in eval mode.

SPDY's reconstruction (:mod:`jaxcompress.spdy`) needs every compressible layer's *input* in
the dense and in the compressed model, differentiably in the params. For the BatchNorm
SmallCNN this module re-implements the eval-mode forward over pure-dict params
(``nnx.to_pure_dict(nnx.state(model, nnx.Param))``) and running statistics, and returns those
inputs ("taps") beside the logits. ``tests/test_experiment_spdy.py`` checks that the logits
equal ``model(x)`` in eval mode.

Per block ``i``: ``a_i = g_i * relu(BN(conv(h_i, K_i)))`` then 2x2 max pooling where the model
pools; ``g_i`` is an optional per-channel gate. Structured (output-channel) compression uses
``g_i = [K_i[..., c] != 0 for some entry]``: a dropped channel then outputs exactly 0, so the
masked model computes the same function as the physically narrower one
(:func:`slice_channels`), whose run time is what the measured timing table predicts.
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

    def names(self, *, head: bool = True) -> tuple[str, ...]:
        convs = tuple(f"blocks/{i}/conv/kernel" for i in range(len(self.strides)))
        return (*convs, "head/kernel") if head else convs


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


def forward(
    arch: Arch, params: dict, stats: dict, x: jax.Array, *, gated: bool = False
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Eval-mode logits and the input of every conv/dense layer (``{name: input}``)."""
    taps = {}
    h = x
    for i, (s, pool) in enumerate(zip(arch.strides, arch.pool_after, strict=True)):
        blk, st = params["blocks"][i], stats["blocks"][i]
        k = blk["conv"]["kernel"]
        taps[f"blocks/{i}/conv/kernel"] = h
        z = conv(k, h, stride=s)
        z = (z - st["bn"]["mean"]) * jax.lax.rsqrt(st["bn"]["var"] + BN_EPSILON)
        h = jax.nn.relu(z * blk["bn"]["scale"] + blk["bn"]["bias"])
        if gated:
            h = h * jnp.any(k != 0, axis=(0, 1, 2)).astype(h.dtype)
        if pool:
            h = nnx.max_pool(h, (2, 2), strides=(2, 2), padding="SAME")
    feat = jnp.mean(h, axis=(1, 2))
    taps["head/kernel"] = feat
    return feat @ params["head"]["kernel"] + params["head"]["bias"], taps


def slice_channels(arch: Arch, params: dict, stats: dict) -> tuple[dict, dict]:
    """Physically drop every conv output channel whose filter is all zero (and the matching
    input channels of the next conv / head rows). Returns smaller ``(params, stats)``."""
    params = jax.tree.map(np.asarray, params)
    stats = jax.tree.map(np.asarray, stats)
    new_p = {"blocks": {}, "head": dict(params["head"])}
    new_s = {"blocks": {}}
    keep_in = None
    for i in range(len(arch.strides)):
        blk, st = params["blocks"][i], stats["blocks"][i]
        k = blk["conv"]["kernel"]
        if keep_in is not None:
            k = k[:, :, keep_in, :]
        keep = np.flatnonzero(np.any(blk["conv"]["kernel"] != 0, axis=(0, 1, 2)))
        new_p["blocks"][i] = {
            "conv": {"kernel": k[..., keep]},
            "bn": {n: v[keep] for n, v in blk["bn"].items()},
        }
        new_s["blocks"][i] = {"bn": {n: v[keep] for n, v in st["bn"].items()}}
        keep_in = keep
    new_p["head"]["kernel"] = params["head"]["kernel"][keep_in, :]
    return new_p, new_s
