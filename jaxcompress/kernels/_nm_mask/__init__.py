"""N:M magnitude mask: reference, Pallas kernel and dispatch."""
