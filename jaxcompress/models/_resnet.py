"""CIFAR-style ResNets (He et al., 2016): ResNet-8, ResNet-20 and any depth 6n + 2."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcompress._checks import check_int
from jaxcompress.models._common import (
    BN_EPSILON,
    BN_MOMENTUM,
    check_image_batch,
    check_rngs,
    conv_kernel_init,
)


def _conv(in_features: int, out_features: int, kernel: int, stride: int, rngs: nnx.Rngs):
    return nnx.Conv(
        in_features,
        out_features,
        (kernel, kernel),
        strides=(stride, stride),
        padding="SAME",
        use_bias=False,
        kernel_init=conv_kernel_init,
        rngs=rngs,
    )


def _bn(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)


class BasicBlock(nnx.Module):
    """Residual basic block: :math:`y = \\operatorname{relu}(F(x) + S(x))`.

    :math:`F = \\mathrm{BN} \\circ \\mathrm{conv}_{3\\times3} \\circ \\operatorname{relu} \\circ
    \\mathrm{BN} \\circ \\mathrm{conv}_{3\\times3, \\text{stride}}` and :math:`S` is the identity,
    or a 1x1 strided convolution + BN (projection, "option B" of He et al., 2016) when the
    stride or the channel count changes.

    Attributes: ``conv1``, ``bn1``, ``conv2``, ``bn2`` and, when projecting, ``shortcut_conv``
    and ``shortcut_bn`` (otherwise ``None``).
    Call: ``(N, H, W, in)`` -> ``(N, ceil(H / stride), ceil(W / stride), out)``.
    """

    def __init__(self, in_features: int, out_features: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = _conv(in_features, out_features, 3, stride, rngs)
        self.bn1 = _bn(out_features, rngs)
        self.conv2 = _conv(out_features, out_features, 3, 1, rngs)
        self.bn2 = _bn(out_features, rngs)
        if stride != 1 or in_features != out_features:
            self.shortcut_conv = _conv(in_features, out_features, 1, stride, rngs)
            self.shortcut_bn = _bn(out_features, rngs)
        else:
            self.shortcut_conv = None
            self.shortcut_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        if self.shortcut_conv is not None and self.shortcut_bn is not None:  # set together
            x = self.shortcut_bn(self.shortcut_conv(x))
        return jax.nn.relu(h + x)


class ResNet(nnx.Module):
    """CIFAR ResNet of depth ``6n + 2`` (He et al., 2016, "Deep Residual Learning for Image
    Recognition", arXiv:1512.03385, Sec. 4.2).

    A 3x3 stem convolution to ``width`` channels (+ BN + ReLU), then three stages of ``n``
    :class:`BasicBlock` with ``width``, ``2 width`` and ``4 width`` channels (the first block
    of stages 2 and 3 has stride 2), global average pooling and a Dense head. The stride-2
    convolutions use SAME padding, so any spatial size >= 1 and any channel count work.
    ResNet-20 with ``width=16`` and 3 input channels has 272,474 parameters (0.27M, as in
    the paper; the 1x1 projection shortcuts add 2,752 over the paper's zero-padding ones).

    Args:
      depth: ``6n + 2`` with ``n >= 1`` (8, 14, 20, 32, 44, 56, 110, ...).
      in_channels: input channels.
      num_classes: number of logits.
      width: channels of the stem and first stage.
      rngs: ``nnx.Rngs`` for initialisation.

    Attributes: ``stem_conv``, ``stem_bn``, ``stages`` (``nnx.List`` of ``nnx.List`` of
    :class:`BasicBlock`), ``head``.
    Call: ``x`` of shape ``(N, H, W, in_channels)`` -> logits ``(N, num_classes)``.
    """

    def __init__(
        self,
        depth: int,
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 16,
        rngs: nnx.Rngs,
    ):
        if isinstance(depth, bool) or not isinstance(depth, numbers.Integral):
            raise TypeError(f"depth must be an int of the form 6n + 2, got {depth!r}")
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(
                f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), got {depth!r}"
            )
        self.depth = int(depth)
        self.in_channels = check_int("in_channels", in_channels)
        self.num_classes = check_int("num_classes", num_classes)
        self.width = check_int("width", width)
        check_rngs(rngs)
        blocks_per_stage = (self.depth - 2) // 6
        self.stem_conv = _conv(self.in_channels, self.width, 3, 1, rngs)
        self.stem_bn = _bn(self.width, rngs)
        stages = []
        in_features = self.width
        for stage, mult in enumerate((1, 2, 4)):
            out_features = self.width * mult
            blocks = []
            for i in range(blocks_per_stage):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(BasicBlock(in_features, out_features, stride, rngs=rngs))
                in_features = out_features
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.head = nnx.Linear(in_features, self.num_classes, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """Globally pooled features ``(N, 4 * width)`` before the head."""
        check_image_batch("ResNet", x, self.in_channels)
        x = jax.nn.relu(self.stem_bn(self.stem_conv(x)))
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return jnp.mean(x, axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


def resnet8(**kwargs) -> ResNet:
    """ResNet-8 (``n = 1``); keyword arguments as :class:`ResNet` (``rngs`` required)."""
    return ResNet(8, **kwargs)


def resnet20(**kwargs) -> ResNet:
    """ResNet-20 (``n = 3``); keyword arguments as :class:`ResNet` (``rngs`` required)."""
    return ResNet(20, **kwargs)
