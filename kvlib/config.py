"""Model configurations: the handful of numbers that decide the shape of the KV cache.

`ModelConfig` describes one decoder; `PRESETS` holds the configurations of real models,
each taken from its paper or its official released configuration (the BibTeX key of
the source is in `PRESET_SOURCES`). `preset(name)` looks one up by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

ATTENTION_KINDS = ("MHA", "GQA", "MQA", "MLA")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only transformer (Llama-style unless said otherwise).

    Attributes:
        n_layers: transformer blocks.
        n_heads: query heads per layer.
        n_kv_heads: key/value heads per layer (== n_heads for MHA, 1 for MQA).
        head_dim: size of one head's vectors.
        hidden_size: width of the residual stream.
        intermediate_size: width of the feed-forward layer.
        vocab_size: number of tokens.
        rope_base: RoPE frequency base (theta).
        norm_eps: RMSNorm epsilon.
        max_position: longest context the model was trained for.
        kv_lora_rank: MLA only (DeepSeek-V2's d_c): size of the compressed latent vector
            that replaces per-head keys and values in the cache; 0 for every other kind.
        rope_head_dim: MLA only (d_h^R): size of the decoupled RoPE key, shared by all
            heads and cached beside the latent; 0 for every other kind.
        sliding_window: tokens each layer attends to (and must keep) if the model uses
            sliding-window attention on every layer; None if it attends to everything.
        n_params: total parameter count (all experts of a mixture-of-experts model),
            or None if unknown.
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
    kv_lora_rank: int = 0
    rope_head_dim: int = 0
    sliding_window: int | None = None
    n_params: int | None = None

    def __post_init__(self) -> None:
        for name in ("n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_size",
                     "intermediate_size", "vocab_size", "max_position"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.kv_lora_rank < 0 or self.rope_head_dim < 0:
            raise ConfigError("kv_lora_rank and rope_head_dim cannot be negative")
        if (self.kv_lora_rank == 0) != (self.rope_head_dim == 0):
            raise ConfigError("an MLA model needs both kv_lora_rank and rope_head_dim "
                              f"(got {self.kv_lora_rank} and {self.rope_head_dim})")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive, got {self.sliding_window}")
        if self.n_params is not None and self.n_params <= 0:
            raise ConfigError(f"n_params must be positive, got {self.n_params}")

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head (1 = MHA, n_heads = MQA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def attention_kind(self) -> str:
        """'MLA' (latent cache), 'MHA' (a KV head per query head), 'MQA' (one KV head)
        or 'GQA' (groups of query heads share a KV head)."""
        if self.kv_lora_rank:
            return "MLA"
        if self.n_kv_heads == self.n_heads:
            return "MHA"
        if self.n_kv_heads == 1:
            return "MQA"
        return "GQA"

    @property
    def kv_values_per_token_per_layer(self) -> int:
        """Numbers one token adds to one layer's cache.

        MHA/GQA/MQA: a key and a value per KV head, 2 * n_kv_heads * head_dim.
        MLA: one latent plus one shared RoPE key, kv_lora_rank + rope_head_dim.
        """
        if self.attention_kind == "MLA":
            return self.kv_lora_rank + self.rope_head_dim
        return 2 * self.n_kv_heads * self.head_dim


# GGUF stores RMSNorm's epsilon as float32: 1e-5 reads back as 9.999999747378752e-06.
_EPS_1E5_FLOAT32 = float(np.float32(1e-5))

PRESETS: dict[str, ModelConfig] = {
    # Read from the GGUF file kvlib runs (tests check the two are equal);
    # n_params = elements of every tensor in the file (embeddings tied).
    "smollm2-135m": ModelConfig(
        n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, hidden_size=576,
        intermediate_size=1536, vocab_size=49152, rope_base=100000.0,
        norm_eps=_EPS_1E5_FLOAT32, max_position=8192, n_params=134_515_008),
    # GPT-2 small (the paper's "117M"; 124,439,808 counted from the released shapes).
    "gpt2": ModelConfig(
        n_layers=12, n_heads=12, n_kv_heads=12, head_dim=64, hidden_size=768,
        intermediate_size=3072, vocab_size=50257, max_position=1024,
        n_params=124_439_808),
    # Llama 2 paper Table 1 (7B: 4k context, no GQA) + LLaMA paper Table 2 (dim 4096,
    # 32 heads, 32 layers); FFN 11008 and vocabulary 32000 from the released config.
    "llama-2-7b": ModelConfig(
        n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, hidden_size=4096,
        intermediate_size=11008, vocab_size=32000, max_position=4096,
        n_params=6_738_415_616),
    # Llama 3 paper Table 3: 32 layers, dim 4096, FFN 14336, 32 heads, 8 KV heads,
    # RoPE theta 500,000; vocabulary 128,256 in the released config.
    "llama-3-8b": ModelConfig(
        n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_size=4096,
        intermediate_size=14336, vocab_size=128256, rope_base=500000.0,
        max_position=8192, n_params=8_030_261_248),
    # Llama 3 paper Table 3: 80 layers, dim 8192, FFN 28672, 64 heads, 8 KV heads.
    "llama-3-70b": ModelConfig(
        n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128, hidden_size=8192,
        intermediate_size=28672, vocab_size=128256, rope_base=500000.0,
        max_position=8192, n_params=70_553_706_496),
    # Mistral 7B paper Table 1: dim 4096, 32 layers, head_dim 128, hidden 14336,
    # 32 heads, 8 KV heads, window 4096, context 8192, vocabulary 32000.
    "mistral-7b": ModelConfig(
        n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_size=4096,
        intermediate_size=14336, vocab_size=32000, max_position=8192,
        sliding_window=4096, n_params=7_241_732_096),
    # Falcon-7B: multi-query attention, 71 heads of 64, 32 layers, d_model 4544,
    # vocabulary 65024, 2048-token context (Falcon paper; released config).
    "falcon-7b": ModelConfig(
        n_layers=32, n_heads=71, n_kv_heads=1, head_dim=64, hidden_size=4544,
        intermediate_size=18176, vocab_size=65024, max_position=2048,
        n_params=6_921_720_704),
    # Qwen2.5 technical report Table 1 (7B: 28 layers, 28 query / 4 KV heads, 128K
    # context); hidden 3584, FFN 18944, vocabulary 152064, theta 1e6 in the config.
    "qwen2.5-7b": ModelConfig(
        n_layers=28, n_heads=28, n_kv_heads=4, head_dim=128, hidden_size=3584,
        intermediate_size=18944, vocab_size=152064, rope_base=1000000.0,
        norm_eps=1e-6, max_position=131072, n_params=7_615_616_512),
    # DeepSeek-V2 paper §2.1 and Appendix: 60 layers, 128 heads of d_h = 128,
    # hidden 5120, MLA with d_c = 512 and d_h^R = 64, 128K context, "236B" parameters
    # (235,741,434,880 counted from the released config: MoE with 160 routed + 2 shared
    # experts of width 1536 per layer, the first layer dense with width 12288).
    "deepseek-v2": ModelConfig(
        n_layers=60, n_heads=128, n_kv_heads=128, head_dim=128, hidden_size=5120,
        intermediate_size=12288, vocab_size=102400, rope_base=10000.0, norm_eps=1e-6,
        max_position=131072, kv_lora_rank=512, rope_head_dim=64,
        n_params=235_741_434_880),
}

# BibTeX keys (references.bib) of the source of each preset's numbers.
PRESET_SOURCES: dict[str, tuple[str, ...]] = {
    "smollm2-135m": ("allal2025smollm2",),
    "gpt2": ("radford2019gpt2",),
    "llama-2-7b": ("touvron2023llama2", "touvron2023llama"),
    "llama-3-8b": ("grattafiori2024llama3",),
    "llama-3-70b": ("grattafiori2024llama3",),
    "mistral-7b": ("jiang2023mistral",),
    "falcon-7b": ("almazrouei2023falcon",),
    "qwen2.5-7b": ("qwen2024qwen25",),
    "deepseek-v2": ("deepseek2024v2",),
}


def preset(name: str) -> ModelConfig:
    """The configuration of a real model by name (see `PRESETS`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(PRESETS)}") from None
