"""The quantized cache on the command line: generate and perplexity."""

import json
import subprocess
import sys

TEXT = ("Memory is never free, never perfect and never quite large enough. The craft of "
        "building computers is the craft of deciding what to remember, how precisely to "
        "remember it, and where to keep it so that it can be found again in time.")


def run(*args):
    return subprocess.run([sys.executable, "-m", "kvlib", *args], capture_output=True,
                          text=True, timeout=600)


def test_generate_with_int8_and_int4_caches():
    base = ("generate", "The capital of France is", "--max-new-tokens", "6", "--json", "--quiet")
    float32 = json.loads(run(*base).stdout)
    int8 = run(*base, "--cache", "int8", "--key-axis", "token", "--group-size", "64")
    int4 = run(*base, "--cache", "int4", "--group-size", "32", "--window", "4")
    assert int8.returncode == int4.returncode == 0, int8.stderr + int4.stderr
    assert json.loads(int8.stdout)["token_ids"] == float32["token_ids"]
    row = json.loads(int4.stdout)
    assert row["cache"] == "int4" and len(row["token_ids"]) == 6


def test_perplexity_json_reports_the_three_numbers(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    common = ("perplexity", "--text", str(path), "--first-chunk", "16", "--chunk", "16",
              "--json", "--quiet")
    out = run(*common, "--cache", "int4", "--window", "8")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["cache"] == "int4 K/channel G32 R8"
    assert report["tokens"] > 40
    assert 1 < report["perplexity"] < 1000 and 0.5 < report["top1_agreement"] <= 1
    assert report["float32_bytes_per_token"] == 46080
    assert 0 < report["bytes_per_token"] < 46080
    f32 = json.loads(run(*common, "--cache", "contiguous").stdout)
    assert f32["top1_agreement"] == 1 and f32["perplexity"] == f32["float32_perplexity"]
    assert f32["float32_perplexity"] == report["float32_perplexity"]


def test_bad_quantization_options_are_clear_errors(tmp_path):
    out = run("generate", "x", "--cache", "int4", "--group-size", "5", "--quiet")
    assert out.returncode == 2 and "kvlib: error: group size 5 does not divide" in out.stderr
    out = run("perplexity", "--text", str(tmp_path / "missing.txt"), "--quiet")
    assert out.returncode == 2 and "kvlib: error: cannot read --text" in out.stderr
