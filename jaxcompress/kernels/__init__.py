"""N:M (2:4) sparsity kernels: mask, pack/unpack, a matmul that reads packed weights, and the
Flax NNX conversion of a trained N:M model to packed inference layers.

Implementation modules are private: one folder per op (``_nm_mask``, ``_nm_pack``,
``_nm_matmul``), each with ``reference.py`` (fused jnp: the specification and the path on
every backend) and ``api.py``; ``_nm_matmul/kernel.py`` is the Pallas Mosaic GPU kernel for
sm90 (H100/H200), also runnable in the Mosaic GPU interpreter anywhere
(``implementation='interpret'``); ``_dispatch`` chooses kernel vs dense from a measured
table (``nm_policy.json``). The NNX names (:class:`NMLinear`, :class:`NMConv1x1`, :class:`NMMeta`,
:class:`SparsifyReport`, :func:`sparsify_for_inference`) load Flax on first use only, so
``import jaxcompress.kernels`` stays Flax-free.
"""

from typing import TYPE_CHECKING

from jaxcompress import _lazy
from jaxcompress.kernels._common import MetaLayout
from jaxcompress.kernels._dispatch import load_policy, nm_linear, select_implementation
from jaxcompress.kernels._nm_mask.api import nm_mask, nm_violations
from jaxcompress.kernels._nm_matmul.api import nm_matmul
from jaxcompress.kernels._nm_matmul.config import NMMatmulConfig
from jaxcompress.kernels._nm_pack.api import pack_nm, unpack_nm
from jaxcompress.kernels._nm_pack.format import PackedNM

if TYPE_CHECKING:  # pragma: no cover
    from jaxcompress.kernels._nnx import (
        NMConv1x1,
        NMLinear,
        NMMeta,
        SparsifyReport,
        sparsify_for_inference,
    )

_NNX_NAMES = ("NMConv1x1", "NMLinear", "NMMeta", "SparsifyReport", "sparsify_for_inference")

__all__ = [
    "MetaLayout",
    "NMConv1x1",
    "NMLinear",
    "NMMatmulConfig",
    "NMMeta",
    "PackedNM",
    "SparsifyReport",
    "load_policy",
    "nm_linear",
    "nm_mask",
    "nm_matmul",
    "nm_violations",
    "pack_nm",
    "select_implementation",
    "sparsify_for_inference",
    "unpack_nm",
]

__getattr__, __dir__ = _lazy.attributes(__name__, "jaxcompress.kernels._nnx", _NNX_NAMES, __all__)
