"""The real model: SmolLM2-135M-Instruct from its GGUF file, run in NumPy."""

from __future__ import annotations

from pathlib import Path

from gguf import GGUFReader

from .files import default_model_path, read_config, load_weights
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
                 batching: str = "ragged") -> list[Generation]:
        """`generate` on token-id prompts, stopping at the model's stop tokens; fills `text`."""
        results = generate(self.llama, prompts, cache, max_new_tokens, sampler,
                           self.tokenizer.stop_ids, on_token, batching)
        for r in results:
            r.text = self.tokenizer.decode(r.token_ids, skip_special=True)
        return results


def load_model(path: str | Path | None = None, progress: bool = True) -> Model:
    """Load SmolLM2-135M-Instruct (or another Llama GGUF at `path`)."""
    path = Path(path) if path is not None else default_model_path()
    reader = GGUFReader(path)
    config = read_config(reader)
    weights = load_weights(reader, path, config, progress)
    return Model(Llama(config, weights), Tokenizer.from_gguf(reader), path)


__all__ = ["Model", "load_model", "Llama", "Sampler", "Generation", "generate", "Tokenizer"]
