"""Fault injection on the kept arrays (`kvlib.model.array_store`), on small arrays written
by the same code path as the dequantized weights: truncate, delete, overwrite, kill a
build, two builds at once, an unusable folder."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kvlib.errors import CacheDirError
from kvlib.model import array_store
from kvlib.model.array_store import MANIFEST, load_or_build
from kvlib.model.files import cache_root

META = {"config": {"n_layers": 2}}


def arrays():
    rng = np.random.default_rng(0)
    return {"a": rng.standard_normal((64, 32), dtype=np.float32),
            "b": np.arange(1000, dtype=np.float32)}


def make():
    return META, iter(arrays().items())


def load(folder, reports=None):
    return load_or_build(folder, make, report=(reports if reports is not None else []).append)


def assert_intact(meta, loaded):
    assert meta == META
    for name, array in arrays().items():
        np.testing.assert_array_equal(loaded[name], array)


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "store"
    load(folder)
    return folder


def test_warm_load_hashes_nothing(folder, monkeypatch):
    hashed = []
    monkeypatch.setattr(array_store, "crc32_file", lambda path: hashed.append(path) or 0)
    assert_intact(*load(folder))
    assert hashed == []


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


def _delete(path):
    path.unlink()


def _overwrite_with_zeros(path):  # same size, header intact: only the checksum sees it
    data = bytearray(path.read_bytes())
    data[-512:] = bytes(512)
    path.write_bytes(bytes(data))


def _overwrite_with_random(path):
    data = bytearray(path.read_bytes())
    data[200:712] = np.random.default_rng(1).bytes(512)
    path.write_bytes(bytes(data))


def _break_header(path):
    data = bytearray(path.read_bytes())
    data[:6] = b"garbag"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, says", [
    (_truncate, "a.npy"), (_delete, "a.npy"), (_overwrite_with_zeros, "CRC-32 mismatch"),
    (_overwrite_with_random, "CRC-32 mismatch"), (_break_header, "a.npy")])
def test_damage_is_reported_and_rebuilt(folder, damage, says):
    time.sleep(0.02)  # past the file system's timestamp tick: a write changes the mtime
    damage(folder / "a.npy")
    reports = []
    assert_intact(*load(folder, reports))
    assert len(reports) == 1 and "damaged" in reports[0] and says in reports[0]
    reports.clear()
    assert_intact(*load(folder, reports))  # rebuilt: the next load is clean
    assert reports == []


def test_a_lost_manifest_rebuilds(folder):
    (folder / MANIFEST).unlink()
    reports = []
    assert_intact(*load(folder, reports))
    assert "manifest.json is missing" in reports[0]


def test_touched_but_unchanged_data_is_hashed_once(folder, monkeypatch):
    os.utime(folder / "b.npy", ns=(1, 1))
    hashed = []
    real = array_store.crc32_file
    monkeypatch.setattr(array_store, "crc32_file", lambda p: hashed.append(p.name) or real(p))
    reports = []
    assert_intact(*load(folder, reports))
    assert hashed == ["b.npy"] and reports == []
    hashed.clear()
    assert_intact(*load(folder, reports))  # the new mtime was recorded
    assert hashed == []


SLOW_BUILD = """
import sys, time
import numpy as np
from kvlib.model.array_store import load_or_build

def make():
    with open(sys.argv[2], "a") as log:
        log.write("build\\n")
    def gen():
        for i in range(4):
            time.sleep(0.3)
            yield f"x{i}", np.full(100, i, dtype=np.float32)
    return {"n": 4}, gen()

meta, loaded = load_or_build(__import__("pathlib").Path(sys.argv[1]), make)
assert meta == {"n": 4} and [float(loaded[f"x{i}"][0]) for i in range(4)] == [0, 1, 2, 3]
"""


def start_build(folder, log):
    return subprocess.Popen([sys.executable, "-c", SLOW_BUILD, str(folder), str(log)])


def staging(folder):
    return [p for p in folder.parent.iterdir() if ".staging" in p.name]


def test_a_killed_build_leaves_staging_that_the_next_build_removes(tmp_path):
    folder, log = tmp_path / "store", tmp_path / "builds.log"
    proc = start_build(folder, log)
    start = time.monotonic()
    while not staging(folder) and time.monotonic() - start < 60:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(staging(folder)) == 1 and not folder.exists()  # what a dead build leaves
    assert start_build(folder, log).wait(timeout=120) == 0
    assert staging(folder) == [] and folder.exists()
    assert log.read_text().count("build") == 2


def test_two_builds_at_once_build_once(tmp_path):
    folder, log = tmp_path / "store", tmp_path / "builds.log"
    procs = [start_build(folder, log) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert log.read_text().count("build") == 1
    assert staging(folder) == []


def test_unusable_cache_dir_is_a_one_line_error(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(CacheDirError, match="KVLIB_CACHE_DIR"):
        load(a_file / "store")
    monkeypatch.setenv("KVLIB_CACHE_DIR", "")
    with pytest.raises(CacheDirError, match="KVLIB_CACHE_DIR is set but empty"):
        cache_root()


def test_manifest_records_sizes_and_checksums(folder):
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["meta"] == META
    for name, array in arrays().items():
        record = manifest["arrays"][name]
        assert record["bytes"] == (folder / f"{name}.npy").stat().st_size
        assert record["shape"] == list(array.shape) and record["dtype"] == "<f4"
        assert record["crc32"] == array_store.crc32_file(folder / f"{name}.npy")
