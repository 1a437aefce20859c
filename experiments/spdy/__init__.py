"""SPDY on a Fashion-MNIST SmallCNN: search vs DP-only, uniform and global-magnitude profiles at
fixed modelled speedups, with layer-wise and global AdaPrune (``python -m experiments.spdy``)."""
