"""The real model: config, tokenizer, forward, generation."""

import numpy as np
import pytest
from gguf import GGUFReader

from kvlib.errors import ConfigError, KVLibError
from kvlib.model import Sampler
from kvlib.model.files import default_model_path


def test_config_matches_gguf_metadata(model):
    fields = GGUFReader(default_model_path()).fields
    cfg = model.config
    assert cfg.n_layers == fields["llama.block_count"].contents() == 30
    assert cfg.n_heads == fields["llama.attention.head_count"].contents() == 9
    assert cfg.n_kv_heads == fields["llama.attention.head_count_kv"].contents() == 3
    assert cfg.hidden_size == fields["llama.embedding_length"].contents()
    assert cfg.head_dim == 64
    assert cfg.vocab_size == fields["llama.vocab_size"].contents() == 49152
    assert cfg.rope_base == fields["llama.rope.freq_base"].contents() == 100000.0
    assert cfg.intermediate_size == fields["llama.feed_forward_length"].contents()
    assert model.llama.weights.embed.shape == (cfg.vocab_size, cfg.hidden_size)


@pytest.mark.parametrize("text", [
    "Hello, world!", "  leading spaces and\ttabs\nnewlines", "Ünïcödé — ☃ 東京 🚀",
    "Numbers 1234567 and 3.14159", ""])
def test_tokenizer_round_trips_text(model, text):
    assert model.tokenizer.decode(model.tokenizer.encode(text)) == text


def test_digits_are_split_one_by_one(model):
    ids = model.tokenizer.encode("2024")
    assert len(ids) == 4
    assert [model.tokenizer.decode([i]) for i in ids] == list("2024")


@pytest.mark.parametrize("special", ["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
def test_special_tokens_are_single_ids(model, special):
    tok = model.tokenizer
    ids = tok.encode(f"a{special}b")
    assert len(ids) == 3 and ids[1] in tok.special_ids
    assert tok.decode(ids) == f"a{special}b"


def test_chat_template_adds_default_system_prompt(model):
    text = model.tokenizer.render_chat([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    own = model.tokenizer.render_chat([{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Hi"}])
    assert "SmolLM" not in own


def test_forward_is_deterministic(model, prompt_ids):
    a = model.forward(prompt_ids)
    b = model.forward(prompt_ids)
    assert a.dtype == np.float32 and a.shape == (len(prompt_ids), model.config.vocab_size)
    np.testing.assert_array_equal(a, b)


def test_forward_of_a_batch_equals_each_sequence_alone(model, prompt_ids):
    together = model.forward(prompt_ids)
    for i, p in enumerate(prompt_ids):
        np.testing.assert_allclose(together[i], model.forward([p])[0], atol=1e-4, rtol=0)


def test_the_model_answers_a_factual_question(model):
    out = model.generate([model.encode("What is the capital of France?", chat=True)],
                         max_new_tokens=20)[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and out.token_ids[-1] in model.tokenizer.stop_ids


def test_sampling_is_reproducible_with_a_seed(model, prompt_ids):
    def run(seed):
        return model.generate(prompt_ids[:1], max_new_tokens=12,
                              sampler=Sampler(temperature=0.9, top_k=40, top_p=0.95, seed=seed))
    assert run(3)[0].token_ids == run(3)[0].token_ids
    assert any(run(3)[0].token_ids != run(s)[0].token_ids for s in (4, 5, 6))


def test_top_k_one_is_greedy(model, prompt_ids):
    greedy = model.generate(prompt_ids[:1], max_new_tokens=8)[0].token_ids
    sampled = model.generate(prompt_ids[:1], max_new_tokens=8,
                             sampler=Sampler(temperature=1.0, top_k=1, seed=0))[0].token_ids
    assert greedy == sampled


def test_streaming_callback_sees_every_token_in_order(model, prompt_ids):
    seen = []
    out = model.generate(prompt_ids[:2], max_new_tokens=5,
                         on_token=lambda i, t: seen.append((i, t)))
    for i, r in enumerate(out):
        assert [t for j, t in seen if j == i] == r.token_ids


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_k=0), dict(top_p=0.0),
                                    dict(top_p=1.5)])
def test_bad_sampler_settings_are_rejected(kwargs):
    with pytest.raises(ConfigError):
        Sampler(**kwargs)


def test_bad_tokens_are_rejected(model):
    with pytest.raises(KVLibError):
        model.forward([[model.config.vocab_size]])
    with pytest.raises(KVLibError):
        model.forward([[]])
    with pytest.raises(ConfigError):
        model.generate([[]])
