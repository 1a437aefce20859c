"""Multi-layer perceptron (LeNet-300-100 by default)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcompress._checks import check_int
from jaxcompress.models._common import check_int_tuple, check_rngs


class MLP(nnx.Module):
    """Fully connected ReLU network on flattened inputs.

    With the defaults this is LeNet-300-100 (LeCun et al., 1998, "Gradient-based learning
    applied to document recognition"), the classic pruning benchmark of Han et al. (2015),
    "Learning both Weights and Connections", arXiv:1506.02626:

    .. math::
        h_0 = \\operatorname{vec}(x) \\in \\mathbb{R}^{784},\\quad
        h_{i+1} = \\operatorname{relu}(h_i W_i + b_i),\\quad
        \\text{logits} = h_L W_L + b_L,

    with ``W_i`` of Flax layout ``(in, out)``. 784-300-100-10 has 266,610 parameters.

    Args:
      in_features: size of the flattened input, ``prod(x.shape[1:])``.
      hidden: widths of the hidden layers (may be empty: multinomial logistic regression).
      num_classes: number of output logits.
      rngs: ``nnx.Rngs`` used for the initial weights.

    Attributes:
      layers: ``nnx.List`` of ``nnx.Linear``; ``layers[-1]`` is the classifier head.

    Call: ``x`` of shape ``(N, *feature_dims)`` with ``prod(feature_dims) == in_features``
    (e.g. ``(N, 28, 28, 1)``) -> logits ``(N, num_classes)``.
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: tuple[int, ...] = (300, 100),
        num_classes: int = 10,
        *,
        rngs: nnx.Rngs,
    ):
        self.in_features = check_int("in_features", in_features)
        self.hidden = check_int_tuple("hidden", hidden, allow_empty=True)
        self.num_classes = check_int("num_classes", num_classes)
        check_rngs(rngs)
        sizes = (self.in_features, *self.hidden, self.num_classes)
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.in_features:
            raise ValueError(
                f"MLP expects x of shape (N, ...) with {self.in_features} features per example, "
                f"got shape {x.shape}"
            )
        h = jnp.reshape(x, (x.shape[0], self.in_features))
        for layer in self.layers[:-1]:
            h = jax.nn.relu(layer(h))
        return self.layers[-1](h)
