"""Triton kernels of oes_fast (imported lazily; importing this package does not import triton)."""
