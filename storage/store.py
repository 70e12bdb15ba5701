"""Opening and creating feature stores of either format, at a local path or an fsspec URL (``s3://...``)."""

from __future__ import annotations

import dataclasses
import os

from storage.base import StoreReader, StoreWriter, read_manifest, write_manifest
from storage.errors import StoreError
from storage.files import MANIFEST_NAME, Location, atomic_write_bytes
from storage.manifest import FORMATS, Manifest
from storage.pca_basis import SIDE_NAME, side_sha256
from storage.wds_store import WdsReader, create_wds
from storage.zarr_store import ZarrReader, create_zarr


def detect_format(path: str | os.PathLike, fmt: str | None = None) -> str:
    """The store format for ``path``: ``fmt`` if given, else "zarr" for a ``*.zarr`` name, else "wds" (tar shards)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise StoreError(f"unknown store format {fmt!r}: choose one of {', '.join(FORMATS)}")
        return fmt
    return "zarr" if os.fspath(path).rstrip("/").endswith(".zarr") else "wds"


def create_store(path: str | os.PathLike, manifest: Manifest, overwrite: bool = False,
                 side: bytes | None = None) -> StoreWriter:
    """A writer for a store at ``path`` (a local path or an fsspec URL such as ``s3://bucket/f.zarr``) in
    ``manifest.format``.

    An existing store of the same job (``compatible_with`` finds no difference) is opened to
    resume; one of another job is refused unless ``overwrite`` wipes it. A path holding
    anything that is not a store is never touched. With several writer processes, one creates
    the store first; the others then make this same call, which opens it, and each writes its
    own shards; one process calls ``finalize`` after all are done.

    ``side`` is the codec's side file (``storage.pca_basis.side_bytes``) for a codec that needs one: written
    after the manifest and before any shard, unless the store (being resumed) already holds one, which is kept.
    """
    location = Location(path)
    try:
        return _create(location, manifest, overwrite, side)
    except OSError as error:  # unreachable endpoint, missing bucket, refused credentials, full disk
        raise StoreError(f"cannot write the store at {location} ({type(error).__name__}: {error}): check the path, "
                         "or for object storage the bucket, credentials and AWS_ENDPOINT_URL") from None


def _create(location: Location, manifest: Manifest, overwrite: bool, side: bytes | None) -> StoreWriter:
    fs, root = location.fs, location.root
    location.refresh()
    if fs.isfile(root):
        raise StoreError(f"{location} is a file, not a feature store: choose another output path")
    if fs.isdir(root) and fs.ls(root, detail=False):
        if not location.isfile(MANIFEST_NAME):
            raise StoreError(f"{location} is not empty and holds no feature store: choose an empty or new output path")
        try:
            existing = read_manifest(location)
        except StoreError as error:
            if not overwrite:
                raise StoreError(f"store at {location} has a damaged manifest ({error}): pass --overwrite to replace "
                                 "it") from None
            existing = None
        if overwrite:
            fs.rm(root, recursive=True)
        else:
            differences = existing.compatible_with(manifest)
            if differences:
                raise StoreError(f"store at {location} was written by another job (store vs this run: "
                                 f"{'; '.join(differences)}): pass --overwrite to replace it, or choose another path")
    manifest = dataclasses.replace(manifest, shards=[])
    if location.is_local:  # an object store has no directories to make
        fs.makedirs(root, exist_ok=True)
    if not location.isfile(MANIFEST_NAME):
        write_manifest(location, manifest)
    if manifest.codec_side is not None and not location.isfile(SIDE_NAME):
        if side is None or side_sha256(side) != manifest.codec_side["sha256"]:
            raise StoreError(f"codec {manifest.codec} needs its side file, whose sha256 the manifest names: pass "
                             "the bytes it was computed from")
        atomic_write_bytes(location, SIDE_NAME, side)
    # Both creators are idempotent: resuming a store whose creation was interrupted completes it.
    return create_zarr(location, manifest) if manifest.format == "zarr" else create_wds(location, manifest)


def open_store(path: str | os.PathLike) -> StoreReader:
    """A reader for the finalized store at ``path``, a local path or an fsspec URL (format read from its manifest)."""
    location = Location(path)
    try:
        manifest = read_manifest(location)
    except OSError as error:
        raise StoreError(f"cannot read the store at {location} ({type(error).__name__}: {error}): check the path, "
                         "or for object storage the bucket, credentials and AWS_ENDPOINT_URL") from None
    if manifest is None:
        raise StoreError(f"no feature store at {location}: run `pkd-offline extract` first")
    if len(manifest.shards) != manifest.n_shards:
        raise StoreError(f"feature store at {location} is unfinished ({len(manifest.shards)} of {manifest.n_shards} "
                         "shards in its manifest): re-run `pkd-offline extract` to resume it")
    return ZarrReader(location, manifest) if manifest.format == "zarr" else WdsReader(location, manifest)


def existing_side(path: str | os.PathLike) -> bytes | None:
    """The side file of a store at ``path`` (finished or not) whose manifest names one and whose sha256 matches:
    what a resumed extraction keeps instead of fitting again. None where there is no such store or file."""
    location = Location(path)
    try:
        manifest = read_manifest(location)
    except (StoreError, OSError):
        return None
    if manifest is None or manifest.codec_side is None or not location.isfile(SIDE_NAME):
        return None
    data = location.fs.cat_file(location.path(SIDE_NAME))
    return data if side_sha256(data) == manifest.codec_side["sha256"] else None
