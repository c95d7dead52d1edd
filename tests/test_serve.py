"""`kvlib serve` driven by the official `openai` client over loopback HTTP."""

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from kvlib.cache import PagedCache
from kvlib.engine import Engine
from kvlib.serve import BackgroundServer, create_app, listen

from test_engine import greedy_alone

NEW = 6
PROMPTS = ["The capital of France is", "Once upon a time", "The key to a good bread is",
           "In 1969, the first", "Water boils at", "My favourite colour is",
           "The three primary colours are", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def served(model):
    cache = PagedCache.from_config(model.config, num_blocks=64, block_size=16, max_seqs=8)
    engine = Engine(model, cache, max_batch=8, token_budget=128)
    with BackgroundServer(create_app(model, engine), listen("127.0.0.1", 0)) as server:
        yield server, engine


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="not-needed",
                         max_retries=0, timeout=300)


def health(served):
    with urllib.request.urlopen(served[0].url + "/health") as reply:
        return json.load(reply)


def stream_completion(client, prompt, max_tokens=NEW):
    chunks = client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens,
                                       temperature=0, stream=True)
    parts, finish = [], None
    for chunk in chunks:
        parts.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    return "".join(parts), finish


def test_eight_concurrent_streams_equal_each_prompt_alone(model, served, client):
    alone = [model.tokenizer.decode(greedy_alone(model, model.encode(p), NEW),
                                    skip_special=True) for p in PROMPTS]
    steps_before = health(served)["steps"]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(lambda p: stream_completion(client, p), PROMPTS))
    assert [text for text, _ in results] == alone
    assert {finish for _, finish in results} <= {"length", "stop"}
    # the streams shared forward steps: far fewer steps than tokens
    assert health(served)["steps"] - steps_before < len(PROMPTS) * NEW
    after = health(served)
    assert after["running"] == after["waiting"] == after["blocks_in_use"] == 0


def test_chat_completion_streamed_and_whole(model, served, client):
    question = "What is the capital of France?"
    ids = model.encode(question, chat=True)
    want = model.tokenizer.decode(greedy_alone(model, ids, NEW), skip_special=True)
    messages = [{"role": "user", "content": question}]
    whole = client.chat.completions.create(model="m", messages=messages, max_tokens=NEW,
                                           temperature=0)
    assert whole.choices[0].message.content == want
    assert whole.usage.prompt_tokens == len(ids) and whole.usage.completion_tokens <= NEW
    chunks = client.chat.completions.create(model="m", messages=messages, max_tokens=NEW,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want and chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list()] == ["SmolLM2-135M-Instruct"]
    assert health(served)["status"] == "ok"


def test_a_client_that_disconnects_frees_its_blocks(served, client):
    steps_before = health(served)["steps"]
    chunks = client.completions.create(model="m", prompt="Once upon a time, in a land far "
                                       "away, there lived",
                                       max_tokens=500, temperature=0, stream=True)
    stream = iter(chunks)
    received = [next(stream), next(stream)]
    assert health(served)["blocks_in_use"] > 0 and len(received) == 2
    chunks.close()                       # the client goes away mid-stream
    for _ in range(600):                 # the engine notices at its next token
        now = health(served)
        if now["running"] == 0:
            break
        time.sleep(0.1)
    assert now["running"] == now["waiting"] == now["blocks_in_use"] == 0
    assert now["steps"] - steps_before < 250  # cancelled long before 500 tokens


def post(served, body: bytes):
    request = urllib.request.Request(served[0].url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)
    raise AssertionError("expected an error status")


def test_malformed_json_is_a_400(served):
    status, body = post(served, b'{"prompt": "hi", "max_tokens": ')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("kwargs, words", [
    ({"max_tokens": 0}, "max_tokens must be at least 1"),
    ({"max_tokens": -3}, "max_tokens must be at least 1"),
    ({"max_tokens": "ten"}, "max_tokens must be int"),
    ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
    ({"temperature": "hot"}, "temperature must be int or float"),
    ({"prompt": "hello " * 8200}, "past the context"),          # SmolLM2: 8192 tokens
    ({"prompt": "hello " * 1100}, "could never finish"),        # the pool: 1024 slots
    ({"prompt": [1.5, 2]}, "prompt must be"),
    ({"extra_body": {"frequency": 3}}, "unrecognized request argument: frequency"),
    ({"seed": -1}, "seed must be >= 0"),
])
def test_bad_requests_get_a_400_and_the_engine_keeps_running(served, client, kwargs, words):
    fields = {"model": "m", "prompt": "Hello", "max_tokens": 2} | kwargs
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**fields)
    assert caught.value.status_code == 400
    assert words in caught.value.body["message"]
    reply = client.completions.create(model="m", prompt="Hello", max_tokens=2, temperature=0)
    assert reply.usage.completion_tokens >= 1
    assert health(served)["blocks_in_use"] == 0


def test_bad_chat_messages_get_a_400(client):
    with pytest.raises(openai.BadRequestError, match="string role and string content"):
        client.chat.completions.create(model="m", messages=[{"role": "user"}])


@pytest.mark.parametrize("port", [70000, "busy"])
def test_kvlib_serve_refuses_a_port_it_cannot_listen_on(port, capsys):
    from kvlib.cli import main

    busy = listen("127.0.0.1", 0)
    port = busy.getsockname()[1] if port == "busy" else port
    assert main(["serve", "--port", str(port), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvlib: error:") and str(port) in err[0]
    busy.close()
