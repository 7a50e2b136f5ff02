"""GPU validation suite for kvsim (needs torch + a CUDA GPU; kvsim itself never imports torch)."""
