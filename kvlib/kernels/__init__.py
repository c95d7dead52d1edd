"""Compiled attention kernels: `cpu` (Numba, multi-threaded CPU)."""
