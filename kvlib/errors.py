"""The exceptions `kvlib` raises for bad input.

Every check runs *before* any state changes, so a call that raises leaves its
cache (or pool, or engine) exactly as it was.
"""


class KVLibError(Exception):
    """Base class of every error `kvlib` raises on purpose."""


class ShapeError(KVLibError, ValueError):
    """An array has the wrong number of dimensions or the wrong sizes."""


class DTypeError(KVLibError, TypeError):
    """An array has the wrong element type."""


class CapacityError(KVLibError):
    """A write would go past the space a cache reserved for a sequence."""


class UnknownSequenceError(KVLibError, LookupError):
    """A sequence id that the cache does not hold.

    (A `LookupError`, not a `KeyError`: a KeyError prints its message in quotes.)"""


class DuplicateSequenceError(KVLibError, ValueError):
    """The same sequence appears twice in one step (or a request id is added twice)."""


class LayerIndexError(KVLibError, IndexError):
    """A layer index outside [0, n_layers)."""


class TokenIdError(KVLibError, ValueError):
    """A token id outside the model's vocabulary."""


class ConfigError(KVLibError, ValueError):
    """A configuration value that cannot work (unknown preset, bad size...)."""


class ModelFileError(KVLibError):
    """The model file is missing or lacks a field the loader needs."""


class LengthError(KVLibError, ValueError):
    """A length or position outside what a sequence holds (e.g. cropping past its end)."""


class ContextLengthError(LengthError):
    """A position past the model's context (the longest sequence it was trained on)."""


class QuantizationError(ConfigError):
    """A quantization layout that cannot work (unsupported bit width, a group size that
    does not divide its axis, values too large for the stored scale)."""


class OutOfBlocksError(CapacityError):
    """A paged pool has too few free (or evictable) blocks for a request.

    Raised before anything changes, so a scheduler can catch it and preempt.
    """


class DoubleFreeError(KVLibError):
    """Freeing a sequence that was already freed, or releasing a block nobody holds."""


class BlockStateError(KVLibError):
    """A block of a paged pool used in a way its state forbids (retaining a free block,
    keying a block nobody holds) or a block number outside the pool."""


class CacheDirError(KVLibError):
    """The folder of the dequantized model cache (KVLIB_CACHE_DIR) cannot be used."""
