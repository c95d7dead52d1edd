"""Model configurations: the handful of numbers that decide the shape of the KV cache."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-style decoder.

    Attributes:
        n_layers: transformer blocks.
        n_heads: query heads per layer.
        n_kv_heads: key/value heads per layer (== n_heads for MHA, 1 for MQA).
        head_dim: size of one head's vectors.
        hidden_size: width of the residual stream.
        intermediate_size: width of the SwiGLU feed-forward layer.
        vocab_size: number of tokens.
        rope_base: RoPE frequency base (theta).
        norm_eps: RMSNorm epsilon.
        max_position: longest context the model was trained for.
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    max_position: int = 2048

    def __post_init__(self) -> None:
        for name in ("n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_size",
                     "intermediate_size", "vocab_size", "max_position"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head (1 = MHA, n_heads = MQA)."""
        return self.n_heads // self.n_kv_heads
