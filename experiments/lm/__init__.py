"""Char-level GPT on Tiny Shakespeare: one-shot magnitude, Wanda and SparseGPT pruning of
AdamW-, CrAM- and AC/DC-trained models (``python -m experiments.lm``)."""
