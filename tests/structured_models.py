"""Models defined only in the tests of structured pruning (jc.prune.structured, jc.spdy groups).

``ResBlockNet``: a stem, a basic residual block (Conv-BN-ReLU-Conv-BN + identity) and an
inverted-residual block (1x1 expand, depthwise 3x3, 1x1 project, + identity), global average
pooling and a Dense head. Its prunable groups, with the multiply-adds per example on an
``H x W`` input (stride 1, SAME padding), ``s`` the residual stream, ``a`` the basic block's
inner channels, ``e`` the expanded channels (a depthwise conv passes them through):

    stem 9*3*s,  conv1 9*s*a,  conv2 9*a*s,  expand s*e,  dw 9*e,  project e*s   (all x H*W)
    head s*classes

``ConvNeXtNet``: ConvNeXt blocks (Liu et al., 2022: depthwise 7x7 conv, LayerNorm, pointwise
MLP with GELU, layer scale, residual); only the MLP's hidden units are prunable (LayerNorm
reduces over the stream's channels).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class ResBlockNet(nnx.Module):
    def __init__(self, s: int = 8, a: int = 6, e: int = 12, classes: int = 5, *, rngs: nnx.Rngs):
        conv = dict(use_bias=False, rngs=rngs)
        self.stem = nnx.Conv(3, s, (3, 3), **conv)
        self.stem_bn = nnx.BatchNorm(s, rngs=rngs)
        self.conv1 = nnx.Conv(s, a, (3, 3), **conv)
        self.bn1 = nnx.BatchNorm(a, rngs=rngs)
        self.conv2 = nnx.Conv(a, s, (3, 3), **conv)
        self.bn2 = nnx.BatchNorm(s, rngs=rngs)
        self.expand = nnx.Conv(s, e, (1, 1), **conv)
        self.bn3 = nnx.BatchNorm(e, rngs=rngs)
        self.dw = nnx.Conv(e, e, (3, 3), feature_group_count=e, **conv)
        self.bn4 = nnx.BatchNorm(e, rngs=rngs)
        self.project = nnx.Conv(e, s, (1, 1), **conv)
        self.bn5 = nnx.BatchNorm(s, rngs=rngs)
        self.head = nnx.Linear(s, classes, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.stem_bn(self.stem(x)))
        r = self.bn2(self.conv2(jax.nn.relu(self.bn1(self.conv1(h)))))
        h = jax.nn.relu(h + r)
        r = jax.nn.relu(self.bn4(self.dw(jax.nn.relu(self.bn3(self.expand(h))))))
        h = h + self.bn5(self.project(r))
        return self.head(h.mean(axis=(1, 2)))


def resblock_macs(hw: int, s: int, a: int, e: int, classes: int = 5) -> int:
    """Hand count of ResBlockNet's multiply-adds per example (module docstring)."""
    return hw * (9 * 3 * s + 9 * s * a + 9 * a * s + s * e + 9 * e + e * s) + s * classes


class _ConvNeXtBlock(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.dwconv = nnx.Conv(dim, dim, (7, 7), feature_group_count=dim, rngs=rngs)
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.pw1 = nnx.Linear(dim, hidden, rngs=rngs)
        self.pw2 = nnx.Linear(hidden, dim, rngs=rngs)
        self.gamma = nnx.Param(jnp.full((dim,), 0.5))

    def __call__(self, x):
        h = self.pw2(jax.nn.gelu(self.pw1(self.norm(self.dwconv(x)))))
        return x + self.gamma[...] * h


class ConvNeXtNet(nnx.Module):
    def __init__(self, dim: int = 8, hidden: int = 16, classes: int = 5, *, rngs: nnx.Rngs):
        self.stem = nnx.Conv(3, dim, (2, 2), strides=(2, 2), rngs=rngs)
        self.stem_norm = nnx.LayerNorm(dim, rngs=rngs)
        self.blocks = nnx.List([_ConvNeXtBlock(dim, hidden, rngs=rngs) for _ in range(2)])
        self.head = nnx.Linear(dim, classes, rngs=rngs)

    def __call__(self, x):
        x = self.stem_norm(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(axis=(1, 2)))


def numpy_init(ctor, seed: int = 0) -> nnx.Module:
    """``ctor()``'s model with every state leaf drawn by NumPy (no JAX random kernels to
    compile: test set-up in milliseconds). Kernels ~ N(0, 1/fan_in); biases, means ~ 0.1 N;
    scales and variances ~ U(0.5, 1.5); RNG keys and counts as ``jax.random.key(seed)``, 0."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(nnx.eval_shape(ctor))

    def draw(path, leaf):
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        name = str(keys[-1]) if keys else ""
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.key(seed)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.zeros(leaf.shape, leaf.dtype)
        if name in ("scale", "var"):
            v = rng.uniform(0.5, 1.5, leaf.shape)
        elif leaf.ndim >= 2:
            v = rng.normal(0, 1 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)
        else:
            v = 0.1 * rng.normal(size=leaf.shape)
        return jnp.asarray(v, leaf.dtype)

    model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))
    model.eval()
    return model


CASES = ("resblock", "convnext", "resnet8", "transformer")


def case_model(name: str) -> nnx.Module:
    """One of :data:`CASES`, NumPy-initialised (cheap to build; cache it in the test module)."""
    import jaxcompress as jc

    if name == "resblock":
        return numpy_init(lambda: ResBlockNet(rngs=nnx.Rngs(0)))
    if name == "convnext":
        return numpy_init(lambda: ConvNeXtNet(rngs=nnx.Rngs(0)))
    if name == "resnet8":
        return numpy_init(lambda: jc.models.resnet8(rngs=nnx.Rngs(0)))
    return numpy_init(
        lambda: jc.models.TransformerClassifier(
            50, d_model=16, num_heads=4, mlp_dim=32, max_len=8, num_layers=2, rngs=nnx.Rngs(0)
        )
    )


def case_input(name: str, key: jax.Array, batch: int) -> jax.Array:
    """A random input batch of the model of :func:`case_model`."""
    if name in ("resblock", "convnext"):
        return jax.random.normal(key, (batch, 8, 8, 3))
    if name == "resnet8":
        return jax.random.normal(key, (batch, 16, 16, 3))
    return jax.random.randint(key, (batch, 8), 0, 50)
