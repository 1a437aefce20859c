"""Small convolutional classifier with BatchNorm (conv-BN-ReLU blocks, max pooling, GAP)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcompress._checks import check_int
from jaxcompress.models._common import (
    BN_EPSILON,
    BN_MOMENTUM,
    check_image_batch,
    check_int_tuple,
    check_rngs,
    conv_kernel_init,
)


class ConvBlock(nnx.Module):
    """``relu(BN(conv3x3(x)))`` with a bias-free convolution (the BN shift is the bias).

    BatchNorm (Ioffe & Szegedy, 2015, arXiv:1502.03167) normalises each channel with batch
    statistics in ``model.train()`` mode and with running averages in ``model.eval()`` mode:
    :math:`y = \\gamma (z - \\mu) / \\sqrt{\\sigma^2 + \\epsilon} + \\beta`.

    Attributes: ``conv`` (kernel ``(3, 3, in, out)``), ``bn`` (``scale``/``bias`` of ``(out,)``).
    Call: ``(N, H, W, in)`` -> ``(N, ceil(H / stride), ceil(W / stride), out)`` (SAME padding).
    """

    def __init__(self, in_features: int, out_features: int, stride: int = 1, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(
            in_features,
            out_features,
            (3, 3),
            strides=(stride, stride),
            padding="SAME",
            use_bias=False,
            kernel_init=conv_kernel_init,
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(out_features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


class SmallCNN(nnx.Module):
    """A cheap VGG-style CNN for 28x28 (or any size) grey-scale or colour images.

    ``len(widths)`` blocks of :class:`ConvBlock` with the given ``strides`` (default: 2 for the
    first block, 1 after); a 2x2/stride-2 max pool (SAME padding, so any spatial size >= 1
    works) follows every block whose ``pool_after`` entry is true (default: all but the last).
    Then global average pooling and a Dense head:

    .. math::
        \\text{logits} = W^\\top \\frac{1}{HW} \\sum_{h,w} a_L[h, w, :] + b.

    With the defaults on 28x28x1 the three blocks run at 14, 7 and 4 pixels (94,186
    parameters, about 2.1 MMAC per image): a 60k-example epoch costs about 30 CPU-seconds
    (batch 128). Measured on Fashion-MNIST (AdamW, peak lr 3e-3 with cosine decay over the
    run, weight decay 1e-4, seed 0): 90.5% test accuracy after 4 epochs, 90.8% after 5.
    ``strides=(1, 1, 1)`` keeps full resolution in the first block at 3.6x the cost.
    ``widths=(32, 32, 64, 64)`` gives a four-conv-layer net (a channel-gating setting).

    Args:
      in_channels: input channels ``C``.
      num_classes: number of logits.
      widths: output channels of each conv block; its length is the number of conv layers.
      strides: one convolution stride per block; ``None`` means ``(2, 1, 1, ...)``.
      pool_after: one bool per block; ``None`` means pool after every block but the last.
      rngs: ``nnx.Rngs`` for initialisation.

    Attributes: ``blocks`` (``nnx.List`` of :class:`ConvBlock`), ``head`` (``nnx.Linear``).
    Call: ``x`` of shape ``(N, H, W, in_channels)`` -> logits ``(N, num_classes)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (32, 64, 128),
        *,
        strides: Sequence[int] | None = None,
        pool_after: Sequence[bool] | None = None,
        rngs: nnx.Rngs,
    ):
        self.in_channels = check_int("in_channels", in_channels)
        self.num_classes = check_int("num_classes", num_classes)
        self.widths = check_int_tuple("widths", widths)
        if pool_after is None:
            pool = tuple(i < len(self.widths) - 1 for i in range(len(self.widths)))
        else:
            if isinstance(pool_after, (str, bytes)) or not isinstance(pool_after, Sequence):
                raise TypeError(f"pool_after must be a sequence of bools, got {pool_after!r}")
            pool = tuple(bool(p) for p in pool_after)
            if len(pool) != len(self.widths):
                raise ValueError(
                    f"pool_after must have one entry per block (len(widths)={len(self.widths)}), "
                    f"got {pool_after!r}"
                )
        self.pool_after = pool
        if strides is None:
            self.strides = (2,) + (1,) * (len(self.widths) - 1)
        else:
            self.strides = check_int_tuple("strides", strides)
            if len(self.strides) != len(self.widths):
                raise ValueError(
                    f"strides must have one entry per block (len(widths)={len(self.widths)}), "
                    f"got {strides!r}"
                )
        check_rngs(rngs)
        chans = (self.in_channels, *self.widths)
        self.blocks = nnx.List(
            [
                ConvBlock(a, b, stride, rngs=rngs)
                for a, b, stride in zip(chans[:-1], chans[1:], self.strides, strict=True)
            ]
        )
        self.head = nnx.Linear(self.widths[-1], self.num_classes, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """Pooled features ``(N, widths[-1])`` before the head."""
        check_image_batch("SmallCNN", x, self.in_channels)
        for block, pool in zip(self.blocks, self.pool_after, strict=True):
            x = block(x)
            if pool:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        return jnp.mean(x, axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))
