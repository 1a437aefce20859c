"""Flax NNX models used by tests, experiments and notebooks.

All models map a batch to logits with ``model(x)``; ``model.train()`` / ``model.eval()``
switch BatchNorm (batch vs running statistics) and dropout. Kernels use Flax layouts:
Dense ``(in, out)``, Conv ``(kh, kw, in, out)``.
"""

from jaxcompress.models.cnn import ConvBlock, SmallCNN
from jaxcompress.models.mlp import MLP
from jaxcompress.models.resnet import BasicBlock, ResNet, resnet8, resnet20
from jaxcompress.models.transformer import EncoderBlock, TransformerClassifier

__all__ = [
    "MLP",
    "BasicBlock",
    "ConvBlock",
    "EncoderBlock",
    "ResNet",
    "SmallCNN",
    "TransformerClassifier",
    "resnet8",
    "resnet20",
]
