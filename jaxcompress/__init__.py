"""jaxcompress: model compression for JAX as pure functions and optax transformations.

Submodules are imported on first use (``jc.masks``, ``jc.optim``, ...), so ``import
jaxcompress`` stays cheap and the Flax/TensorFlow-dependent parts load only when needed.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = [  # noqa: RUF022
    "__version__",
    "checkpoint",
    "data",
    "kernels",
    "latency",
    "masks",
    "models",
    "optim",
    "prune",
    "sharding",
    "spdy",
    "structure",
    "train",
]
_SUBMODULES = frozenset(__all__[1:])

if TYPE_CHECKING:  # pragma: no cover
    from jaxcompress import (  # noqa: F401
        checkpoint,
        data,
        kernels,
        latency,
        masks,
        models,
        optim,
        prune,
        sharding,
        spdy,
        structure,
        train,
    )


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f"jaxcompress.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'jaxcompress' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
