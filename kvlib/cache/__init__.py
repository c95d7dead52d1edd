"""KV caches. All honour the protocol in `kvlib.cache.base`."""

from .base import KVCache, StepPlan
from .contiguous import ContiguousCache

__all__ = ["KVCache", "StepPlan", "ContiguousCache"]
from .quantized import QuantizedCache, QuantScheme  # noqa: E402

__all__ += ["QuantizedCache", "QuantScheme"]
