"""N:M pack / unpack: the packed format, reference, Pallas kernels and dispatch."""
