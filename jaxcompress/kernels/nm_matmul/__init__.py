"""N:M matmul ``x @ W`` with ``W`` packed: reference, Pallas kernel, config and dispatch."""

from jaxcompress.kernels.nm_matmul.api import nm_matmul
from jaxcompress.kernels.nm_matmul.config import NMMatmulConfig
from jaxcompress.kernels.nm_matmul.kernel import nm_matmul_pallas
from jaxcompress.kernels.nm_matmul.reference import nm_matmul_reference

__all__ = ["NMMatmulConfig", "nm_matmul", "nm_matmul_pallas", "nm_matmul_reference"]
