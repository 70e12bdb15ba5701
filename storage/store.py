"""Opening and creating feature stores of either format (local paths)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from storage.base import StoreReader, StoreWriter, read_manifest, write_manifest
from storage.errors import StoreError
from storage.files import MANIFEST_NAME
from storage.manifest import FORMATS, Manifest
from storage.wds_store import WdsReader, create_wds
from storage.zarr_store import ZarrReader, create_zarr


def detect_format(path: str, fmt: str | None = None) -> str:
    """The store format for ``path``: ``fmt`` if given, else "zarr" for a ``*.zarr`` name, else "wds" (tar shards)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise StoreError(f"unknown store format {fmt!r}: choose one of {', '.join(FORMATS)}")
        return fmt
    return "zarr" if str(path).rstrip("/").endswith(".zarr") else "wds"


def create_store(path: str, manifest: Manifest, overwrite: bool = False) -> StoreWriter:
    """A writer for a store at ``path`` in ``manifest.format``.

    An existing store of the same job (``compatible_with`` finds no difference) is opened to
    resume; one of another job is refused unless ``overwrite`` wipes it. A path holding
    anything that is not a store is never touched. With several writer processes, one creates
    the store first; the others then make this same call, which opens it, and each writes its
    own shards; one process calls ``finalize`` after all are done.
    """
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise StoreError(f"{root} is a file, not a feature store: choose another output path")
    if root.is_dir() and any(root.iterdir()):
        if not (root / MANIFEST_NAME).is_file():
            raise StoreError(f"{root} is not empty and holds no feature store: choose an empty or new output path")
        try:
            existing = read_manifest(root)
        except StoreError as error:
            if not overwrite:
                raise StoreError(f"store at {root} has a damaged manifest ({error}): pass --overwrite to replace it") \
                    from None
            existing = None
        if overwrite:
            shutil.rmtree(root)
        else:
            differences = existing.compatible_with(manifest)
            if differences:
                raise StoreError(f"store at {root} was written by another job (store vs this run: "
                                 f"{'; '.join(differences)}): pass --overwrite to replace it, or choose another path")
    manifest = dataclasses.replace(manifest, shards=[])
    root.mkdir(parents=True, exist_ok=True)
    if not (root / MANIFEST_NAME).is_file():
        write_manifest(root, manifest)
    # Both creators are idempotent: resuming a store whose creation was interrupted completes it.
    return create_zarr(root, manifest) if manifest.format == "zarr" else create_wds(root, manifest)


def open_store(path: str) -> StoreReader:
    """A reader for the finalized store at ``path`` (format read from its manifest)."""
    root = Path(path)
    manifest = read_manifest(root) if root.is_dir() else None
    if manifest is None:
        raise StoreError(f"no feature store at {root}: run `pkd-offline extract` first")
    if len(manifest.shards) != manifest.n_shards:
        raise StoreError(f"feature store at {root} is unfinished ({len(manifest.shards)} of {manifest.n_shards} "
                         "shards in its manifest): re-run `pkd-offline extract` to resume it")
    return ZarrReader(root, manifest) if manifest.format == "zarr" else WdsReader(root, manifest)
