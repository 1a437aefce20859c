"""Experiments reproducing the papers' claims with jaxcompress; never imported by the library."""
