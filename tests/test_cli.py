"""The command line, run as a user would."""

import json
import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "kvlib", *args], capture_output=True,
                          text=True, timeout=300)


def test_generate_json_one_object_per_prompt_in_order():
    out = run("generate", "What is the capital of France?", "Name a color.", "--chat",
              "--max-new-tokens", "12", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["What is the capital of France?", "Name a color."]
    assert "Paris" in rows[0]["text"]
    assert all(1 <= len(r["token_ids"]) <= 12 for r in rows)
    assert "tokens/s" in out.stderr


def test_generate_plain_text_same_with_and_without_cache():
    a = run("generate", "The sky is", "--max-new-tokens", "8", "--quiet")
    b = run("generate", "The sky is", "--max-new-tokens", "8", "--quiet", "--cache", "none")
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout and a.stdout.strip()
    assert a.stderr == ""


def test_bad_input_is_a_clear_error():
    out = run("generate", "x", "--top-p", "2", "--quiet")
    assert out.returncode == 2
    assert "kvlib: error: argument --top-p: must be a finite number in (0, 1]" in out.stderr


def test_prefill_chunk_gives_the_same_text():
    a = run("generate", "The sky is", "--max-new-tokens", "6", "--quiet")
    b = run("generate", "The sky is", "--max-new-tokens", "6", "--quiet", "--prefill-chunk", "2")
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout and a.stdout.strip()


def test_prefill_chunk_needs_a_cache_and_a_positive_size():
    for extra in (["--cache", "none"], ["--prefill-chunk", "0"]):
        out = run("generate", "x", "--max-new-tokens", "2", "--quiet", "--prefill-chunk", "3",
                  *extra)
        assert out.returncode == 2
        assert out.stderr.startswith("kvlib: error: ") and "--prefill-chunk" in out.stderr
