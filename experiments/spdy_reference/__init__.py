"""Reproduce SPDY's reference DP profiles from the published timing tables."""
