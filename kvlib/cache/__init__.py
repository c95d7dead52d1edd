"""KV caches. All honour the protocol in `kvlib.cache.base`."""

from .base import Cache, KVCache, StepPlan
from .block_pool import BlockPool, prefix_key
from .contiguous import ContiguousCache
from .padded import PaddedCache
from .paged import PagedCache, paged_cache_nbytes
from .quantized import QuantizedCache, QuantScheme

__all__ = ["Cache", "KVCache", "StepPlan", "ContiguousCache", "PaddedCache", "BlockPool",
           "PagedCache", "paged_cache_nbytes", "prefix_key", "QuantizedCache", "QuantScheme"]
