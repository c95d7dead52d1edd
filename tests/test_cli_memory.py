"""`kvlib memory`, run as a user would."""

import json
import subprocess
import sys

from kvlib.config import PRESETS


def run(*args):
    return subprocess.run([sys.executable, "-m", "kvlib", "memory", *args],
                          capture_output=True, text=True, timeout=120)


def test_json_gives_bytes_per_token_and_total():
    out = run("--model", "llama-3-8b", "--tokens", "8192", "--batch", "2", "--json")
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["bytes_per_token"] == 131072 and row["total_bytes"] == 2 * 8192 * 131072
    assert (row["attention"], row["dtype"], row["cached_tokens"]) == ("GQA", "fp16", 8192)


def test_low_bit_types_and_the_sliding_window():
    row = json.loads(run("--model", "mistral-7b", "--tokens", "10000", "--dtype", "int4",
                         "--group-size", "64", "--json").stdout)
    assert row["group_size"] == 64 and row["cached_tokens"] == 4096
    assert row["bytes_per_token"] == 32 * 16 * (128 // 2 + 2 * (2 + 2))
    assert row["total_bytes"] == 4096 * row["bytes_per_token"]


def test_plain_text():
    out = run("--model", "smollm2-135m", "--tokens", "1000")
    assert out.returncode == 0
    assert "23,040 bytes per token" in out.stdout and "23,040,000 bytes" in out.stdout


def test_list_names_every_preset():
    out = run("--list")
    assert out.returncode == 0
    assert [line.split()[0] for line in out.stdout.splitlines()] == list(PRESETS)
    assert "MLA" in out.stdout and "window 4096" in out.stdout


def test_bad_input_is_a_clear_error_with_exit_code_2():
    for args, message in [(("--model", "gpt-5", "--tokens", "10"), "unknown model 'gpt-5'"),
                          (("--model", "gpt2", "--tokens", "10", "--dtype", "fp12"),
                           "unknown storage type 'fp12'"),
                          (("--model", "gpt2", "--tokens", "-3"), "argument --tokens: must be >= 1"),
                          (("--model", "gpt2", "--tokens", "3", "--batch", "0"),
                           "argument --batch: must be >= 1"),
                          (("--model", "gpt2",), "memory needs --model NAME and --tokens N")]:
        out = run(*args)
        assert out.returncode == 2 and out.stdout == ""
        assert f"kvlib: error: {message}" in out.stderr, out.stderr
