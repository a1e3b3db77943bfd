"""Benchmarks: scoring and training throughput (mura-ray bench) and the GPU compute core (no Ray)."""
