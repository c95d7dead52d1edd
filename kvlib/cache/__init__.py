"""KV caches. All honour the protocol in `kvlib.cache.base`."""

from .base import KVCache, StepPlan
from .contiguous import ContiguousCache
from .quantized import QuantizedCache, QuantScheme

__all__ = ["KVCache", "StepPlan", "ContiguousCache", "QuantizedCache", "QuantScheme"]
