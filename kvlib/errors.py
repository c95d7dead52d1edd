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


class UnknownSequenceError(KVLibError, KeyError):
    """A sequence id that the cache does not hold."""


class ConfigError(KVLibError, ValueError):
    """A configuration value that cannot work (unknown preset, bad size...)."""


class ModelFileError(KVLibError):
    """The model file is missing or lacks a field the loader needs."""


class LengthError(KVLibError, ValueError):
    """A length or position outside what a sequence holds (e.g. cropping past its end)."""


class QuantizationError(ConfigError):
    """A quantization layout that cannot work (unsupported bit width, a group size that
    does not divide its axis, values too large for the stored scale)."""
