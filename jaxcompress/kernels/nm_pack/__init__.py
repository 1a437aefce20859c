"""N:M pack / unpack: the packed format, reference, Pallas kernels and dispatch."""

from jaxcompress.kernels.nm_pack.api import pack_nm, unpack_nm
from jaxcompress.kernels.nm_pack.format import PackedNM
from jaxcompress.kernels.nm_pack.kernel import pack_pallas, unpack_pallas
from jaxcompress.kernels.nm_pack.reference import pack_reference, unpack_reference

__all__ = [
    "PackedNM",
    "pack_nm",
    "pack_pallas",
    "pack_reference",
    "unpack_nm",
    "unpack_pallas",
    "unpack_reference",
]
