"""kvlib: the key/value cache of LLM inference, built from scratch in NumPy.

The names a reader uses are here: `load_model`, the caches and `generate`. They load on
first use, so that `import kvlib.memory` (arithmetic only) stays light.
"""

import importlib
import os

# Two thread pools share the cores: OpenBLAS (weight products) and Numba's OpenMP threads
# (attention kernels). Each keeps its threads spinning after a call, taking the cores from
# the other; these make them sleep at once. Both are read when the pool starts, so they
# only help if kvlib is imported first (as in the `kvlib` command); `make` sets them for
# the book and the tests (chapter 8).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")   # spin 2**4 cycles, not 2**28
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import ModelConfig  # noqa: E402
from .errors import KVLibError  # noqa: E402

__version__ = "0.1.0"

_LAZY = {
    "load_model": "kvlib.model", "Sampler": "kvlib.model", "generate": "kvlib.model.generate",
    "Cache": "kvlib.cache", "ContiguousCache": "kvlib.cache", "PaddedCache": "kvlib.cache",
    "PagedCache": "kvlib.cache", "QuantizedCache": "kvlib.cache", "QuantScheme": "kvlib.cache",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvlib' has no attribute {name!r}")


__all__ = ["ModelConfig", "KVLibError", "__version__", *_LAZY]
