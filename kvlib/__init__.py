"""kvlib: the key/value cache of LLM inference, built from scratch in NumPy."""

import os

# Two thread pools share the cores: OpenBLAS (weight products) and Numba's OpenMP threads
# (attention kernels). Each keeps its threads spinning after a call, taking the cores from
# the other; these make them sleep at once. Both are read when the pool starts, so they
# only help if kvlib is imported first (as in the `kvlib` command); `make` sets them for
# the book and the tests (chapter 8).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")   # spin 2**4 cycles, not 2**28
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import ModelConfig
from .errors import KVLibError

__version__ = "0.1.0"
__all__ = ["ModelConfig", "KVLibError", "__version__"]
