"""N:M (2:4) sparsity kernels: mask, pack/unpack and a matmul that reads packed weights.

One folder per op (``nm_mask``, ``nm_pack``, ``nm_matmul``), each with ``reference.py``
(pure jnp: the specification and the CPU path), ``kernel.py`` (Pallas; Triton on GPU,
interpret mode anywhere) and ``api.py`` (``implementation=`` dispatch). ``dispatch``
chooses kernel vs dense from a measured table. The Flax NNX conversion lives in
``jaxcompress.kernels.nnx`` and is not imported here (this package stays Flax-free).
"""

from jaxcompress.kernels._common import MetaLayout
from jaxcompress.kernels.dispatch import load_policy, nm_linear, select_implementation
from jaxcompress.kernels.nm_mask import nm_mask, nm_violations
from jaxcompress.kernels.nm_matmul import NMMatmulConfig, nm_matmul
from jaxcompress.kernels.nm_pack import PackedNM, pack_nm, unpack_nm

__all__ = [
    "MetaLayout",
    "NMMatmulConfig",
    "PackedNM",
    "load_policy",
    "nm_linear",
    "nm_mask",
    "nm_matmul",
    "nm_violations",
    "pack_nm",
    "select_implementation",
    "unpack_nm",
]
