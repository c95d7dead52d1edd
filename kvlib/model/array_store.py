"""A folder of `.npy` arrays that is built once, checked on every load, rebuilt when damaged.

The dequantized weights live in such a folder (see `kvlib.model.files`). Building it
takes a while, so it is kept between runs, and a kept file can be truncated, deleted or
overwritten. The folder therefore carries a *manifest*, written last: for every array
its file size, shape, dtype, the file's modification time and a CRC-32 of its bytes,
plus a small JSON `meta` dict (the model's config and tokenizer, so that a warm load
need not parse the GGUF file again).

Loading checks, every time, that each file exists with the size, shape and dtype the
manifest records. The data is hashed again only for a file whose modification time has
changed since it was last hashed (any write changes it), and the new time is recorded
once the hash matches. A mismatch anywhere is reported on stderr and the folder is
rebuilt.

Building happens in a staging folder renamed into place at the end (atomic: readers
never see half a folder), under an exclusive `fcntl.flock` on a lock file beside it, so
two processes never build at once: the second waits, then finds the folder built. A
builder that dies leaves its staging folder behind; the next builder holds the lock, so
any staging folder it finds is dead and is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import zlib
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..errors import CacheDirError

MANIFEST = "manifest.json"
STAGING_TAG = ".staging"   # staging folder: <folder>.staging<pid>
CHUNK_BYTES = 1 << 24      # bytes hashed per read


def crc32_file(path: Path) -> int:
    """CRC-32 of a file's bytes (zlib's, read in 16 MiB chunks)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
    return crc


def _file_record(path: Path, array: np.ndarray) -> dict:
    stat = path.stat()
    return {"bytes": stat.st_size, "shape": list(array.shape), "dtype": array.dtype.str,
            "mtime_ns": stat.st_mtime_ns, "crc32": crc32_file(path)}


def _read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return {"arrays": dict(manifest["arrays"]), "meta": dict(manifest["meta"])}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _Damaged(f"{MANIFEST} is missing or unreadable ({type(err).__name__})") from None


class _Damaged(Exception):
    """A kept folder does not match its manifest (internal: triggers a rebuild)."""


def _header(path: Path) -> tuple[tuple[int, ...], str, int]:
    """(shape, dtype string, data offset) from a .npy file's header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}[version]
        shape, fortran, dtype = read(f)
        if fortran:
            raise ValueError("Fortran order")
        return tuple(shape), dtype.str, f.tell()


def verify(folder: Path) -> tuple[dict, list[str]]:
    """Check `folder` against its manifest; return (its meta dict, names of files re-hashed).

    Raises `_Damaged` naming the first mismatch. Sizes, shapes and dtypes are checked
    for every file; the CRC-32 only for files whose mtime differs from the manifest's.
    """
    rehashed = []
    manifest = _read_manifest(folder)
    for name, rec in manifest["arrays"].items():
        path = folder / f"{name}.npy"
        try:
            stat = path.stat()
            shape, dtype, offset = _header(path)
        except (OSError, ValueError, KeyError) as err:
            raise _Damaged(f"{path.name}: {getattr(err, 'strerror', None) or err}") from None
        if stat.st_size != rec["bytes"] or list(shape) != rec["shape"] or dtype != rec["dtype"]:
            raise _Damaged(f"{path.name} holds {stat.st_size} bytes {dtype}{list(shape)}; "
                           f"the manifest says {rec['bytes']} bytes {rec['dtype']}{rec['shape']}")
        if stat.st_size != offset + int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise _Damaged(f"{path.name}: header and size disagree")
        if stat.st_mtime_ns != rec["mtime_ns"]:
            if crc32_file(path) != rec["crc32"]:
                raise _Damaged(f"{path.name}: its data changed (CRC-32 mismatch)")
            rehashed.append(name)
    return manifest["meta"], rehashed


def _record_mtimes(folder: Path, names: list[str]) -> None:
    """After re-hashing unchanged data, remember the files' new mtimes (best effort)."""
    path = folder / MANIFEST
    with contextlib.suppress(OSError, ValueError):
        manifest = json.loads(path.read_text())
        for name in names:
            manifest["arrays"][name]["mtime_ns"] = (folder / f"{name}.npy").stat().st_mtime_ns
        tmp = path.with_name(f"{MANIFEST}.{os.getpid()}")
        tmp.write_text(json.dumps(manifest))
        tmp.replace(path)


@contextlib.contextmanager
def build_lock(folder: Path):
    """Hold an exclusive lock on `<folder>.lock` (blocks while another process holds it)."""
    with open(folder.with_name(folder.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _staging_folders(folder: Path) -> list[Path]:
    return sorted(folder.parent.glob(f"{folder.name}{STAGING_TAG}*"))


def build(folder: Path, meta: dict, arrays: Iterable[tuple[str, np.ndarray]]) -> None:
    """Write `arrays` (name, array) and the manifest (with `meta`, JSON-able) to a staging
    folder, then rename it to `folder`. Call with the build lock held. The staging folder
    is removed on any failure (Ctrl-C included)."""
    staging = folder.with_name(f"{folder.name}{STAGING_TAG}{os.getpid()}")
    staging.mkdir()
    try:
        records = {}
        for name, array in arrays:
            path = staging / f"{name}.npy"
            np.save(path, array)
            records[name] = _file_record(path, array)
        (staging / MANIFEST).write_text(json.dumps({"arrays": records, "meta": meta}))
        staging.rename(folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _report(message: str) -> None:
    print(f"kvlib: {message}", file=sys.stderr)


def kept_meta(folder: Path) -> dict | None:
    """The meta dict of a kept folder whose files match its manifest, else None.

    Cheap (sizes and headers only, no hashing): for reading the config before `load`.
    """
    try:
        return _read_manifest(folder)["meta"] if _sizes_match(folder) else None
    except _Damaged:
        return None


def _sizes_match(folder: Path) -> bool:
    arrays = _read_manifest(folder)["arrays"]
    return all(_stat_size(folder / f"{name}.npy") == rec["bytes"] for name, rec in arrays.items())


def _stat_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def load_or_build(folder: Path, make: Callable[[], tuple[dict, Iterable[tuple[str, np.ndarray]]]],
                  report: Callable[[str], None] = _report) -> tuple[dict, dict[str, np.ndarray]]:
    """The meta dict and arrays of `folder` (memory-mapped, read-only), built first if the
    folder is missing or damaged.

    Args:
        folder: where the arrays live (its parent must be a writable folder to build).
        make: called only to build: returns (meta, iterable of (name, array) pairs).
        report: told (one line) when a kept folder is damaged and rebuilt.
    Raises:
        CacheDirError: the parent folder cannot be created or written.
    """
    try:
        meta, rehashed = verify(folder)
    except _Damaged:
        _ensure_dir(folder.parent)
        with _cache_dir_errors(folder.parent), build_lock(folder):
            try:  # another process may have built it while we waited for the lock
                meta, rehashed = verify(folder)
            except _Damaged as damage:
                if folder.exists():
                    report(f"the kept arrays in {folder} are damaged ({damage}); rebuilding")
                    shutil.rmtree(folder)
                for dead in _staging_folders(folder):  # their builders died holding the lock
                    shutil.rmtree(dead, ignore_errors=True)
                build(folder, *make())
                meta, rehashed = verify(folder)
    if rehashed:
        _record_mtimes(folder, rehashed)
    names = _read_manifest(folder)["arrays"]
    return meta, {name: np.load(folder / f"{name}.npy", mmap_mode="r").view(np.ndarray)
                  for name in names}


@contextlib.contextmanager
def _cache_dir_errors(root: Path):
    """Turn an OSError while building into a one-line `CacheDirError`."""
    try:
        yield
    except OSError as err:
        raise CacheDirError(f"cannot build the cache in {root} "
                            f"({err.strerror or err}); set KVLIB_CACHE_DIR to a writable "
                            "folder with enough space") from None


def _ensure_dir(root: Path) -> None:
    with _cache_dir_errors(root):
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
