"""Where a store lives and the file operations both formats share: atomic writes, sha256 of shard files,
shard completion markers.

A store's root is a local directory or an fsspec URL (``s3://bucket/features.zarr``,
``gs://...``, ``file:///...``); every file operation goes through the URL's fsspec filesystem.
Remote filesystems take their settings from the standard environment (for S3:
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``)
or from fsspec's configuration (``FSSPEC_S3_ENDPOINT_URL``, ``~/.config/fsspec/``).

A file is written atomically: locally through a temporary name in the same directory, fsync,
then ``os.replace``; on an object store in one upload (an object PUT, or a multipart upload,
becomes visible only when complete). A shard is complete when its marker
``<store>/shards/{k:06d}.json`` exists; the marker is written only after the shard's data
files, so a crash leaves a shard absent, never half-present.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator

import fsspec
import fsspec.asyn
from fsspec.implementations.local import LocalFileSystem

from storage.errors import StoreError

MANIFEST_NAME = "manifest.json"
MARKER_DIR = "shards"
_BLOCK = 1 << 20


class Location:
    """A store's root: ``fs`` (an fsspec filesystem) and ``root`` (the root's path on it, no trailing slash).

    ``str(location)`` is what messages show: the local path, or the URL for a remote store.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        text = os.fspath(path)
        try:
            self.fs, root = fsspec.core.url_to_fs(text)
        except (ImportError, ValueError) as error:  # unknown protocol, or its package (s3fs, gcsfs) is missing
            raise StoreError(f"cannot open store location {text} ({error}): check the URL, or install the fsspec "
                             "filesystem package for its protocol (s3fs for s3://)") from None
        self.root = root.rstrip("/") or root
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def path(self, relative: str = "") -> str:
        """The filesystem path of ``relative`` (a "/"-separated path under the root)."""
        return f"{self.root}/{relative}" if relative else self.root

    def url(self, relative: str = "") -> str:
        """What users see and can open: the local path, or the full URL of a remote object."""
        path = self.path(relative)
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def __str__(self) -> str:
        return self.url()

    def refresh(self, relative: str = "") -> None:
        """Forget listings fsspec cached under ``relative``: other processes may have written there since."""
        self.fs.invalidate_cache(self.path(relative))

    def isfile(self, relative: str) -> bool:
        return self.fs.isfile(self.path(relative))

    def tree_bytes(self, relative: str = "") -> int:
        """Bytes of every file under ``relative`` (0 when there is none)."""
        path = self.path(relative)
        if not self.fs.isdir(path):
            return 0
        return sum(int(info.get("size") or 0) for info in self.fs.find(path, detail=True).values())


@contextlib.contextmanager
def staged_file(location: Location, relative: str) -> Iterator[str]:
    """A local temporary file to write ``relative``'s bytes into; on a clean exit it becomes ``relative`` atomically.

    Locally the temporary file sits beside the target (fsync, then ``os.replace``); for a remote
    store it is in the system's temporary directory and is uploaded in one piece. On an error
    the target is left as it was.
    """
    target = location.path(relative)
    if location.is_local:
        directory = os.path.dirname(target)
        os.makedirs(directory, exist_ok=True)
        temporary = os.path.join(directory, f".{os.path.basename(target)}.{uuid.uuid4().hex}.tmp")
    else:
        handle, temporary = tempfile.mkstemp(prefix="pkd-store-", suffix=".tmp")
        os.close(handle)
    try:
        yield temporary
        if location.is_local:
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        else:
            location.fs.put_file(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)


def atomic_write_bytes(location: Location, relative: str, data: bytes) -> None:
    """Write ``data`` to ``relative`` under the store root, atomically (see ``staged_file``)."""
    with staged_file(location, relative) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(data)


def remove_file(location: Location, relative: str) -> None:
    """Delete ``relative`` if it exists."""
    with contextlib.suppress(FileNotFoundError):
        location.fs.rm_file(location.path(relative))


def _hash_stream(digest, handle) -> None:
    while block := handle.read(_BLOCK):
        digest.update(block)


def sha256_local_file(path: str) -> str:
    """Hex sha256 of one local file's bytes (the same as ``sha256sum``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        _hash_stream(digest, handle)
    return digest.hexdigest()


def sha256_file(location: Location, relative: str) -> str:
    """Hex sha256 of one store file's bytes (the same as ``sha256sum``), streamed."""
    digest = hashlib.sha256()
    with location.fs.open(location.path(relative), "rb") as handle:
        _hash_stream(digest, handle)
    return digest.hexdigest()


def sha256_files(location: Location, relative_paths: list[str]) -> str:
    """Hex sha256 over several store files in sorted path order.

    Each file contributes its relative path (utf-8), a NUL byte, its size (8 bytes LE) and its bytes.
    """
    digest = hashlib.sha256()
    for relative in sorted(relative_paths):
        with location.fs.open(location.path(relative), "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(0)
            digest.update(relative.encode() + b"\0" + int(size).to_bytes(8, "little"))
            _hash_stream(digest, handle)
    return digest.hexdigest()


def marker_name(shard_index: int) -> str:
    """The marker's path relative to the store root."""
    return f"{MARKER_DIR}/{shard_index:06d}.json"


def write_marker(location: Location, shard_index: int, samples: int, sha256: str) -> None:
    record = {"index": shard_index, "samples": samples, "sha256": sha256}
    atomic_write_bytes(location, marker_name(shard_index), (json.dumps(record) + "\n").encode())


def read_markers(location: Location) -> dict[int, dict]:
    """Completed shards: index -> {"index", "samples", "sha256"}; StoreError naming a damaged marker.

    Lists the marker directory afresh (other processes write markers too) and fetches the markers
    together (concurrently on an object store).
    """
    markers: dict[int, dict] = {}
    location.refresh(MARKER_DIR)
    directory = location.path(MARKER_DIR)
    if not location.fs.isdir(directory):
        return markers
    paths = sorted(path for path in location.fs.ls(directory, detail=False)
                   if fnmatch.fnmatch(path.rstrip("/").rsplit("/", 1)[-1], "[0-9]*.json"))
    contents = location.fs.cat(paths) if paths else {}
    for path in paths:
        shown = location.url(f"{MARKER_DIR}/{path.rsplit('/', 1)[-1]}")
        try:
            record = json.loads(contents[path])
            index = int(record["index"])
            markers[index] = {"index": index, "samples": int(record["samples"]), "sha256": str(record["sha256"])}
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as error:
            raise StoreError(f"shard marker {shown} is damaged ({error}): delete it to re-extract that shard") from None
        if path.rsplit("/", 1)[-1] != f"{index:06d}.json":
            raise StoreError(f"shard marker {shown} names shard {index}: delete it to re-extract that shard")
    return markers


def close_object_store_sessions() -> None:
    """Close the HTTP session of every s3fs filesystem this process opened (a command calls it before exit).

    s3fs closes its session from a finalizer at exit that waits 0.1 s for the event loop; on a busy
    machine that times out, the socket is dropped but the aiohttp session is not closed, and aiohttp
    prints "Unclosed client session" when it is collected. Closing here waits as long as it takes.
    Reads two s3fs attributes without a public accessor (``_cache``, ``_s3``: the client of a connected
    instance); a filesystem never connected is left alone.
    """
    s3fs = sys.modules.get("s3fs")
    if s3fs is None:  # never imported: nothing to close
        return
    for fs in list(s3fs.S3FileSystem._cache.values()):
        client = getattr(fs, "_s3", None)
        if client is None or fs.loop is None or not fs.loop.is_running():
            continue
        with contextlib.suppress(Exception):  # closing is best effort: the command's result is already out
            fsspec.asyn.sync(fs.loop, client.close)
        fs._s3 = None
