"""`kvlib bench attention` and `kvlib generate --backend`, run as a user would."""

import json

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
                "fraction_of_roof"} <= set(r)


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
