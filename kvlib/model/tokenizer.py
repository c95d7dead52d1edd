"""The model's tokenizer, rebuilt from the GGUF file's `tokenizer.ggml.*` fields.

SmolLM2 uses byte-level BPE (as GPT-2) whose pre-tokenizer first splits every digit
on its own. Control tokens such as `<|im_start|>` are added as special tokens, so
they are matched whole and never split by BPE. Chat prompts are rendered with the
Jinja template stored in the file, exactly as the model's authors wrote it.
"""

from __future__ import annotations

import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from ..errors import ModelFileError

CONTROL_TOKEN_TYPE = 3  # llama.cpp's token type for control tokens


class Tokenizer:
    """Text <-> token ids for the model.

    Attributes:
        bos_id, eos_id: from the file's metadata.
        stop_ids: ids that end generation (EOS and `<|endoftext|>`).
        special_ids: ids of control tokens.
    """

    def __init__(self, tokens: list[str], merges: list[str], token_types,
                 bos_id: int, eos_id: int, chat_template: str | None) -> None:
        vocab = {tok: i for i, tok in enumerate(tokens)}
        bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges])
        self._tok = HFTokenizer(bpe)
        self._tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        self._tok.decoder = decoders.ByteLevel()
        types = np.asarray(token_types)
        self.special_ids = [int(i) for i in np.flatnonzero(types == CONTROL_TOKEN_TYPE)]
        self._tok.add_special_tokens(
            [AddedToken(tokens[i], special=True, normalized=False) for i in self.special_ids])
        self.tokens = tokens
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.stop_ids = frozenset({eos_id} | ({vocab["<|endoftext|>"]} if "<|endoftext|>" in vocab else set()))
        self.chat_template = chat_template

    @classmethod
    def from_gguf(cls, reader) -> "Tokenizer":
        return cls(**cls.fields_from_gguf(reader))

    @staticmethod
    def fields_from_gguf(reader) -> dict:
        """The constructor's arguments, read from a GGUF file (plain JSON-able values)."""
        def get(key):
            field = reader.fields.get(key)
            if field is None:
                raise ModelFileError(f"the GGUF file has no field {key!r}")
            return field

        tokens = get("tokenizer.ggml.tokens").contents()
        merges = get("tokenizer.ggml.merges").contents()
        types = [int(t) for t in get("tokenizer.ggml.token_type").contents()]
        template = reader.fields.get("tokenizer.chat_template")
        return {"tokens": list(tokens), "merges": list(merges), "token_types": types,
                "bos_id": int(get("tokenizer.ggml.bos_token_id").contents()),
                "eos_id": int(get("tokenizer.ggml.eos_token_id").contents()),
                "chat_template": template.contents() if template is not None else None}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; control tokens written in the text become one id each."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages` ([{"role": ..., "content": ...}])."""
        if self.chat_template is None:
            raise ModelFileError("the GGUF file has no chat template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt)

    def encode_chat(self, user_text: str) -> list[int]:
        """Ids of a one-turn chat prompt (the template adds its default system prompt)."""
        return self.encode(self.render_chat([{"role": "user", "content": user_text}]))
