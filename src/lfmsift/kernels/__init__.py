"""GPU kernels of the streaming path (Triton, with PyTorch fallbacks that run everywhere)."""
