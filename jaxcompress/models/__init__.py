"""Flax NNX models used by tests, experiments and notebooks.

All models map a batch to logits with ``model(x)`` (:class:`GPT` maps token ids ``(B, T)`` to
next-token logits ``(B, T, vocab)``; :func:`generate` samples from it); ``model.train()`` /
``model.eval()`` switch BatchNorm (batch vs running statistics) and dropout. Kernels use Flax
layouts: Dense ``(in, out)``, Conv ``(kh, kw, in, out)``.
"""

from jaxcompress.models.cnn import ConvBlock, SmallCNN
from jaxcompress.models.gpt import GPT, CausalSelfAttention, GPTBlock, generate
from jaxcompress.models.mlp import MLP
from jaxcompress.models.resnet import BasicBlock, ResNet, resnet8, resnet20
from jaxcompress.models.transformer import EncoderBlock, TransformerClassifier

__all__ = [
    "MLP",
    "GPT",
    "BasicBlock",
    "CausalSelfAttention",
    "ConvBlock",
    "EncoderBlock",
    "GPTBlock",
    "ResNet",
    "SmallCNN",
    "TransformerClassifier",
    "generate",
    "resnet8",
    "resnet20",
]
