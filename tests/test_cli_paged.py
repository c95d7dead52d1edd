"""`kvlib generate --cache paged` and `--n`, run as a user would."""

import json

from test_cli import run


def test_paged_cache_gives_the_same_text_as_contiguous():
    args = ("generate", "The sky is", "Name a color.", "--max-new-tokens", "8", "--quiet")
    contiguous = run(*args)
    paged = run(*args, "--cache", "paged", "--block-size", "7")
    assert contiguous.returncode == paged.returncode == 0, paged.stderr
    assert paged.stdout == contiguous.stdout and paged.stdout.strip()


def test_n_samples_per_prompt_in_json():
    out = run("generate", "Write a haiku about memory.", "--chat", "--cache", "paged",
              "--n", "3", "--temperature", "1.0", "--seed", "1", "--max-new-tokens", "6",
              "--json", "--quiet")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["sample"] for r in rows] == [0, 1, 2]
    assert all(r["cache"] == "paged" and 1 <= len(r["token_ids"]) <= 6 for r in rows)


def test_paged_errors_are_clear():
    too_small = run("generate", "The sky is", "--cache", "paged", "--num-blocks", "1",
                    "--block-size", "2", "--quiet")
    assert too_small.returncode == 2 and "kvlib: error:" in too_small.stderr
    assert "blocks" in too_small.stderr
    no_fork = run("generate", "x", "--n", "2", "--quiet")
    assert no_fork.returncode == 2 and "cannot fork" in no_fork.stderr
    bad = run("generate", "x", "--cache", "paged", "--block-size", "0", "--quiet")
    assert bad.returncode == 2 and "--block-size" in bad.stderr
