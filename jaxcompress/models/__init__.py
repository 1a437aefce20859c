"""Flax NNX models used by tests, experiments and notebooks.

All models map a batch to logits with ``model(x)`` (:class:`GPT` maps token ids ``(B, T)`` to
next-token logits ``(B, T, vocab)``; :func:`generate` samples from it); ``model.train()`` /
``model.eval()`` switch BatchNorm (batch vs running statistics) and dropout. Kernels use Flax
layouts: Dense ``(in, out)``, Conv ``(kh, kw, in, out)``.
"""

from jaxcompress.models._cnn import SmallCNN
from jaxcompress.models._gpt import GPT, generate
from jaxcompress.models._mlp import MLP
from jaxcompress.models._resnet import ResNet, resnet8, resnet20
from jaxcompress.models._transformer import TransformerClassifier

__all__ = [
    "MLP",
    "GPT",
    "ResNet",
    "SmallCNN",
    "TransformerClassifier",
    "generate",
    "resnet8",
    "resnet20",
]
