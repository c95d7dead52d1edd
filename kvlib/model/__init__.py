"""The real model: SmolLM2-135M-Instruct from its GGUF file, run in NumPy."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gguf import GGUFReader

from ..config import ModelConfig
from ..errors import ModelFileError
from .array_store import kept_meta, load_or_build
from .files import (default_model_path, dequantized_tensors, read_config, weights_folder,
                    weights_from)
from .generate import Generation, generate
from .llama import Llama
from .sampling import Sampler
from .tokenizer import Tokenizer


class Model:
    """Config + weights + tokenizer, with text-level helpers around `generate`."""

    def __init__(self, llama: Llama, tokenizer: Tokenizer, path: Path) -> None:
        self.llama = llama
        self.config = llama.config
        self.tokenizer = tokenizer
        self.path = path

    def forward(self, tokens, cache=None, seq_ids=None, all_logits=False):
        return self.llama.forward(tokens, cache, seq_ids, all_logits)

    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Token ids of a prompt; with `chat`, wrapped in the model's chat template."""
        tok = self.tokenizer
        return tok.encode_chat(text) if chat else tok.encode(text)

    def generate(self, prompts, cache=None, max_new_tokens: int = 32,
                 sampler: Sampler | None = None, on_token=None,
                 batching: str | None = None, n: int = 1,
                 prefill_chunk: int | None = None) -> list[Generation]:
        """`generate` on token-id prompts, stopping at the model's stop tokens; fills `text`."""
        results = generate(self.llama, prompts, cache, max_new_tokens, sampler,
                           self.tokenizer.stop_ids, on_token, batching=batching, n=n,
                           prefill_chunk=prefill_chunk)
        for r in results:
            r.text = self.tokenizer.decode(r.token_ids, skip_special=True)
        return results


class ModelFile:
    """A model file opened for its config and tokenizer, no weights yet.

    Cheap, so a caller can check its input against `config` (e.g. the context length)
    before paying for `load`. When the dequantized weights are already kept, config and
    tokenizer come from their manifest; otherwise from the GGUF file's metadata (parsing
    it takes seconds).
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_model_path()
        self.folder = weights_folder(self.path)
        self._reader = None
        self._set_meta(kept_meta(self.folder) or self._read_meta())

    @property
    def reader(self) -> GGUFReader:
        if self._reader is None:
            try:
                self._reader = GGUFReader(self.path)
            except (OSError, ValueError) as err:
                raise ModelFileError(f"cannot read the model file {self.path}: {err}") from None
        return self._reader

    def _read_meta(self) -> dict:
        """Config and tokenizer fields from the GGUF file, as plain JSON-able values."""
        return {"config": dataclasses.asdict(read_config(self.reader)),
                "tokenizer": Tokenizer.fields_from_gguf(self.reader)}

    def _set_meta(self, meta: dict) -> None:
        self.config = ModelConfig(**meta["config"])
        self.tokenizer = Tokenizer(**meta["tokenizer"])

    def load(self, progress: bool = True) -> Model:
        """The model with its float32 weights (dequantized once, then memory-mapped)."""
        meta, tensors = load_or_build(
            self.folder, lambda: (self._read_meta(), dequantized_tensors(self.reader, progress)))
        if ModelConfig(**meta["config"]) != self.config:  # rebuilt since we read it
            self._set_meta(meta)
        weights = weights_from(tensors, self.config)
        return Model(Llama(self.config, weights), self.tokenizer, self.path)


def load_model(path: str | Path | None = None, progress: bool = True) -> Model:
    """Load SmolLM2-135M-Instruct (or another Llama GGUF at `path`)."""
    return ModelFile(path).load(progress)


__all__ = ["Model", "ModelFile", "load_model", "Llama", "Sampler", "Generation", "generate",
           "Tokenizer"]
