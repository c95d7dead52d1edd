"""`kvlib bench attention` and `kvlib generate --backend`, run as a user would."""

import json

import pytest

from test_cli import run


def test_bench_attention_json_rows():
    out = run("bench", "attention", "--batch", "1", "2", "--context", "64", "--repeats", "1",
              "--array-mb", "8", "--json", "--quiet")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["backend"], r["batch"]) for r in rows] == [
        ("numpy", 1), ("numba", 1), ("numpy", 2), ("numba", 2)]
    for r in rows:
        assert r["context"] == 64 and r["seconds"] > 0 and r["gb_per_s"] > 0
        assert r["fraction_of_roof"] > 0
        assert {"backend", "batch", "context", "seconds", "gb_per_s",
                "fraction_of_roof", "beyond_llc"} <= set(r)
        assert r["gb_per_s"] / r["roof_gb_per_s"] == \
            pytest.approx(r["fraction_of_roof"], rel=1e-12)
    assert len({r["roof_gb_per_s"] for r in rows}) == 1     # one roof for the whole run


def test_bench_attention_unknown_backend_is_a_clear_error():
    out = run("bench", "attention", "--backend", "cuda", "--quiet")
    assert out.returncode == 2
    assert "kvlib: error: unknown attention backend" in out.stderr


def test_generate_same_text_with_numpy_and_numba_backends():
    a = run("generate", "The sky is", "--max-new-tokens", "8", "--quiet", "--json")
    b = run("generate", "The sky is", "--max-new-tokens", "8", "--quiet", "--json",
            "--backend", "numba")
    assert a.returncode == b.returncode == 0, b.stderr
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]


def test_bench_prefill_json_rows():
    out = run("bench", "prefill", "--tokens", "96", "--repeats", "1", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["backend"] for r in rows] == ["numpy", "numba"]
    for r in rows:
        assert r["tokens"] == 96 and r["seconds"] > 0 and r["attention_seconds"] > 0
        assert r["tokens_per_s"] == 96 / r["seconds"]
        assert r["gflop_per_s"] / r["matmul_roof_gflop_per_s"] == \
            pytest.approx(r["fraction_of_roof"], rel=1e-12)
    assert rows[0]["gflop"] == rows[1]["gflop"]


def test_bench_decode_json_rows():
    out = run("bench", "decode", "--context", "40", "--batch", "3", "--steps", "1",
              "--backend", "numba", "--json")
    assert out.returncode == 0, out.stderr
    (row,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert (row["backend"], row["context"], row["batch"]) == ("numba", 40, 3)
    assert row["tokens_per_s"] == 3 / row["step_seconds"]
    assert 0 < row["attention_share"] < 1


def test_bench_prefill_past_the_context_is_refused_before_loading():
    out = run("bench", "prefill", "--tokens", "9000")
    assert out.returncode == 2
    assert out.stderr == "kvlib: error: --tokens 9000 is past the model's context of " \
                         "8192 tokens\n"
