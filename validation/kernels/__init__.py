"""Decode-attention kernels (Triton) and their benchmarks."""
