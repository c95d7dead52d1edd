"""kvlib: the key/value cache of LLM inference, built from scratch in NumPy."""

from .config import ModelConfig
from .errors import KVLibError

__version__ = "0.1.0"
__all__ = ["ModelConfig", "KVLibError", "__version__"]
