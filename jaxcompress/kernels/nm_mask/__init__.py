"""N:M magnitude mask: reference, Pallas kernel and dispatch."""

from jaxcompress.kernels.nm_mask.api import nm_mask, nm_violations
from jaxcompress.kernels.nm_mask.kernel import nm_mask_pallas
from jaxcompress.kernels.nm_mask.reference import nm_mask_reference

__all__ = ["nm_mask", "nm_mask_pallas", "nm_mask_reference", "nm_violations"]
