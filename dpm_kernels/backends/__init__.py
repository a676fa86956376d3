"""Implementations of the fused step: `reference` (PyTorch), `cpu` (C++), `cuda` (C++/CUDA), `triton`."""
