"""The public names of `kvlib`, and dependencies that point down."""

import subprocess
import sys


def test_memory_imports_no_model_code():
    code = ("import sys, kvlib.memory; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('gguf', 'tokenizers', 'jinja2') or m.startswith('kvlib.model')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_readme_example_names_exist():
    import kvlib
    from kvlib.cache import PagedCache
    from kvlib.model import load_model
    from kvlib.model.generate import generate

    assert kvlib.load_model is load_model and kvlib.PagedCache is PagedCache
    assert kvlib.generate is generate
    assert set(kvlib.__all__) >= {"load_model", "generate", "ContiguousCache", "PagedCache",
                                  "QuantizedCache", "PaddedCache", "Cache"}


def test_every_cache_satisfies_the_protocol():
    from kvlib.cache import Cache, ContiguousCache, PaddedCache, PagedCache, QuantizedCache

    caches = [ContiguousCache(1, 1, 8, 1, 4), PaddedCache(1, 1, 8, 1, 4),
              PagedCache(1, 1, 8, 2, 4, 1, 8), QuantizedCache(1, 1, 8, 1, 4)]
    assert all(isinstance(c, Cache) for c in caches)
