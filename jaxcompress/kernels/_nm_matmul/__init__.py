"""N:M matmul ``x @ W`` with ``W`` packed: reference, Pallas kernel, config and dispatch."""
