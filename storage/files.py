"""File helpers shared by both formats: atomic writes, sha256 of shard files, shard completion markers.

A shard is complete when its marker ``<store>/shards/{k:06d}.json`` exists; the marker is
written (atomically) only after the shard's data files, so a crash leaves a shard absent,
never half-present.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

from storage.errors import StoreError

MANIFEST_NAME = "manifest.json"
MARKER_DIR = "shards"
_BLOCK = 1 << 20


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a unique temporary name, fsync, then ``os.replace`` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    """Hex sha256 of one file's bytes (the same as ``sha256sum``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(root: Path, relative_paths: list[str]) -> str:
    """Hex sha256 over several files in sorted path order.

    Each file contributes its relative path (utf-8), a NUL byte, its size (8 bytes LE) and its bytes.
    """
    digest = hashlib.sha256()
    for relative in sorted(relative_paths):
        path = root / relative
        digest.update(relative.encode() + b"\0" + path.stat().st_size.to_bytes(8, "little"))
        with open(path, "rb") as handle:
            while block := handle.read(_BLOCK):
                digest.update(block)
    return digest.hexdigest()


def marker_path(root: Path, shard_index: int) -> Path:
    return root / MARKER_DIR / f"{shard_index:06d}.json"


def write_marker(root: Path, shard_index: int, samples: int, sha256: str) -> None:
    record = {"index": shard_index, "samples": samples, "sha256": sha256}
    atomic_write_bytes(marker_path(root, shard_index), (json.dumps(record) + "\n").encode())


def read_markers(root: Path) -> dict[int, dict]:
    """Completed shards: index -> {"index", "samples", "sha256"}; StoreError naming a damaged marker."""
    markers: dict[int, dict] = {}
    directory = root / MARKER_DIR
    if not directory.is_dir():
        return markers
    for path in sorted(directory.glob("[0-9]*.json")):
        try:
            record = json.loads(path.read_text())
            index = int(record["index"])
            markers[index] = {"index": index, "samples": int(record["samples"]), "sha256": str(record["sha256"])}
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as error:
            raise StoreError(f"shard marker {path} is damaged ({error}): delete it to re-extract that shard") from None
        if path.name != f"{index:06d}.json":
            raise StoreError(f"shard marker {path} names shard {index}: delete it to re-extract that shard")
    return markers
