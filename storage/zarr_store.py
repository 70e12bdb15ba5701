"""The zarr (v3) store format: random access by sample, one shard file per array per store shard.

Layout of ``X.zarr/`` (N samples, S = samples_per_shard, L levels):

- ``s{stride}/{part}``: (N, C, max_h, max_w) for a "map" part, (N, C) for a "channel" part
  (the codec's parts, plus ``sum`` and ``sum_sq`` float64 for a projected level,
  ``Manifest.level_parts``); chunk = one sample, shard = S samples (zarr's ShardingCodec), zstd; maps are zero
  padded past each sample's own size.
- ``image_id`` (N,) int64, ``view_index`` (N,) int16, ``image_hw`` (N, 2) int32 pixels,
  ``feature_hw`` (N, L, 2) int32 (each sample's own map size per level); one chunk = S samples.
- ``shards/{k:06d}.json`` completion markers, ``manifest.json`` (see ``storage.files``).

Every chunk is a zstd frame with a content checksum, so a flipped bit in stored data is a read
error, never a silently different value. The reader also refuses a store shard with a missing
file (zarr itself would read the fill value, zeros, in its place) and a sample whose stored
image id or view is not the one the manifest puts at its index. On a local store whose arrays have
exactly the layout this writer creates, a sample's chunks are read straight from the shard files
(``storage.zarr_direct``: the same bytes and checksums, without zarr's per-call overhead); elsewhere
through zarr.

Store shard k is therefore exactly one file per array (``<array>/c/k/0/...``), so processes
writing different shards never touch the same file. A single file is never torn: zarr 3's
LocalStore writes it through a temporary ``*.partial`` name and renames it, and on an object
store (a URL root: zarr's FsspecStore) it is one upload, which s3fs sends as one PUT below 100 MiB
and as a multipart upload above, visible only when complete. A store shard spans many files, hence
the marker, written last.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.sync import sync

from storage.base import StoreReader, StoreWriter
from storage.codecs import map_shape
from storage.errors import StoreError
from storage.files import Location, sha256_files
from storage.manifest import Manifest
from storage.sample import Sample
from storage.zarr_direct import ChunkFile

_ZSTD_LEVEL = 3
_METADATA = {"image_id": "<i8", "view_index": "<i2", "image_hw": "<i4", "feature_hw": "<i4"}


def array_specs(manifest: Manifest) -> dict[str, tuple[np.dtype, tuple[int, ...], tuple[int, ...] | None]]:
    """Every array of the store: name -> (dtype, shape, shard shape or None when one chunk is one store shard)."""
    n, per_shard = manifest.n_samples, manifest.samples_per_shard
    specs: dict[str, tuple[np.dtype, tuple[int, ...], tuple[int, ...] | None]] = {
        "image_id": (np.dtype(_METADATA["image_id"]), (n,), None),
        "view_index": (np.dtype(_METADATA["view_index"]), (n,), None),
        "image_hw": (np.dtype(_METADATA["image_hw"]), (n, 2), None),
        "feature_hw": (np.dtype(_METADATA["feature_hw"]), (n, len(manifest.levels), 2), None),
    }
    for level in manifest.levels:
        for part, (dtype, kind) in manifest.level_parts(level.stride).items():
            item = (level.channels, level.max_height, level.max_width) if kind == "map" else (level.channels,)
            specs[f"s{level.stride}/{part}"] = (np.dtype(dtype), (n, *item), (per_shard, *item))
    return specs


def create_zarr(location: Location, manifest: Manifest) -> ZarrWriter:
    """Create the store's arrays at ``location`` where absent (so an interrupted creation completes) and open it."""
    # zarr opens a local path with its LocalStore and a URL with its FsspecStore (same fsspec settings as ours).
    group = zarr.open_group(location.url(), mode="a", zarr_format=3)
    for name, (dtype, shape, shards) in array_specs(manifest).items():
        if name in group:
            continue
        per_shard = manifest.samples_per_shard
        chunks = (1, *shape[1:]) if shards else (per_shard, *shape[1:])
        group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, shards=shards, fill_value=0,
                           compressors=ZstdCodec(level=_ZSTD_LEVEL, checksum=True))
    return ZarrWriter(location, manifest)


class ZarrWriter(StoreWriter):
    """Writes store shards of a zarr store created by ``create_zarr``."""

    def __init__(self, location: Location, manifest: Manifest) -> None:
        super().__init__(location, manifest)
        self.group = zarr.open_group(location.url(), mode="r+", zarr_format=3)
        # write_empty_chunks is runtime configuration, not stored: without it an all-zero shard
        # (e.g. view_index with one view) would leave no file, and the shard's file set would vary.
        self.arrays = {name: self.group[name].with_config({"write_empty_chunks": True})
                       for name in array_specs(manifest)}

    def _write_shard_files(self, shard_index: int, samples: list[Sample]) -> str:
        manifest = self.manifest
        span = manifest.shard_range(shard_index)
        rows = slice(span.start, span.stop)
        n = len(samples)
        # One level and part at a time keeps peak memory at one padded block beside the input.
        for level in manifest.levels:
            layout = manifest.level_parts(level.stride)
            blocks = {part: np.zeros((n, level.channels, level.max_height, level.max_width) if kind == "map"
                                     else (n, level.channels), dtype) for part, (dtype, kind) in layout.items()}
            for i, sample in enumerate(samples):
                features = sample.features[level.stride]
                for part, values in self.encode_level(sample, level.stride).items():
                    if layout[part][1] == "map":
                        blocks[part][i, :, : features.shape[1], : features.shape[2]] = values
                    else:
                        blocks[part][i] = values
            for part, block in blocks.items():
                self.arrays[f"s{level.stride}/{part}"][rows] = block
            del blocks
        self.arrays["image_id"][rows] = [s.image_id for s in samples]
        self.arrays["view_index"][rows] = [s.view_index for s in samples]
        self.arrays["image_hw"][rows] = np.array([s.image_hw for s in samples], np.int32).reshape(n, 2)
        self.arrays["feature_hw"][rows] = np.array(
            [[map_shape(s.features[stride])[1:] for stride in manifest.strides] for s in samples], np.int32
        ).reshape(n, len(manifest.levels), 2)
        return sha256_files(self.location, shard_files(self.group, manifest, shard_index))


def shard_files(group: zarr.Group, manifest: Manifest, shard_index: int) -> list[str]:
    """Paths, relative to the store root, of the files that make store shard ``shard_index`` (one per array)."""
    return [f"{name}/{shard_key(group[name], shard_index)}" for name in array_specs(manifest)]


def shard_key(array: zarr.Array, shard_index: int) -> str:
    """The key, under ``array``'s path, of the file holding store shard ``shard_index`` of it."""
    return array.metadata.encode_chunk_key((shard_index,) + (0,) * (array.ndim - 1))


class ZarrReader(StoreReader):
    """Random-access reader of a zarr store; per-shard metadata is cached (a few shards)."""

    _CACHED_SHARDS = 16

    def __init__(self, location: Location, manifest: Manifest, *, direct_reads: bool = True) -> None:
        """``direct_reads``: read a local store's chunks straight from its shard files where its layout allows
        (``storage.zarr_direct``); False reads every sample through zarr's codec pipeline."""
        super().__init__(location, manifest)
        root = self.root
        try:
            self.group = zarr.open_group(location.url(), mode="r", zarr_format=3)
        except Exception as error:  # zarr raises several types for a damaged group
            raise StoreError(f"{root} is not a readable zarr v3 store ({error}): re-run extraction") from None
        self.arrays: dict[str, zarr.Array] = {}
        for name, (dtype, shape, shards) in array_specs(manifest).items():
            try:
                array = self.group[name]
            except KeyError:
                raise StoreError(f"zarr store {root} lacks array {name!r}: the store is damaged; "
                                 "re-extract it") from None
            except Exception as error:  # zarr raises many types for damaged array metadata
                raise StoreError(f"zarr array {root}/{name} has unreadable metadata ({type(error).__name__}: "
                                 f"{str(error)[:200]}): the store is damaged; re-extract it") from None
            stored = np.dtype(array.dtype) if isinstance(array.dtype, np.dtype) else None
            if stored is None or stored.kind not in "biuf":
                raise StoreError(f"zarr array {root}/{name} has dtype {array.dtype}; only numeric dtypes are "
                                 "read (object and string dtypes are refused): the store is not ours")
            if stored != dtype or array.shape != shape:
                raise StoreError(f"zarr array {root}/{name} is {stored} {array.shape}, the manifest implies "
                                 f"{dtype} {shape}: the store is damaged; re-extract it")
            # A store shard must be exactly one file per array, or verify would hash the wrong files.
            grid = array.shards if shards else array.chunks
            if tuple(grid or ()) != (shards or (manifest.samples_per_shard, *shape[1:])):
                raise StoreError(f"zarr array {root}/{name} is split in blocks of {grid}, the manifest's "
                                 f"samples_per_shard {manifest.samples_per_shard} implies "
                                 f"{shards or (manifest.samples_per_shard, *shape[1:])}: the manifest does not "
                                 "describe this store; re-extract it")
            self.arrays[name] = array
        self._metadata: dict[int, dict[str, np.ndarray]] = {}
        self._direct = self._direct_chunk_files() if direct_reads else {}

    def _direct_chunk_files(self) -> dict[str, ChunkFile]:
        """On a local store whose feature arrays all have the layout ``ZarrWriter`` writes, a ``ChunkFile`` per
        array part (``storage.zarr_direct``: a sample's chunks read straight from the shard files); else {} and
        every read goes through zarr."""
        if not self.location.is_local:
            return {}
        direct = {}
        for name in self.arrays:
            if name in _METADATA:
                continue
            try:
                metadata = json.loads(Path(self.location.path(f"{name}/zarr.json")).read_text())
                chunk_file = ChunkFile.for_array(metadata)
            except Exception:  # unreadable here, readable by zarr above: let zarr read it
                chunk_file = None
            if chunk_file is None or chunk_file.chunks_per_shard != self.manifest.samples_per_shard:
                return {}
            direct[name] = chunk_file
        return direct

    def read(self, index: int) -> Sample:
        self._check_index(index)
        k = index // self.manifest.samples_per_shard
        where = f"sample {index} (shard {k} of {self.root})"
        try:
            metadata = self._shard_metadata(k)
        except StoreError as error:
            raise StoreError(f"{where}: {error}") from None
        row = index - k * self.manifest.samples_per_shard
        features, statistics = {}, {}
        try:
            sizes = [(int(h), int(w)) for h, w in metadata["feature_hw"][row]]
            values = self._read_parts(index, sizes)
            for (h, w), level in zip(sizes, self.manifest.levels):
                parts = {part: values[f"s{level.stride}/{part}"] for part in self.manifest.level_parts(level.stride)}
                features[level.stride], sums = self._decode_level(level.stride, parts, (h, w), where)
                if sums:
                    statistics[level.stride] = sums
        except StoreError:
            raise
        except Exception as error:  # zarr/numcodecs raise many types on a damaged shard file
            raise StoreError(f"{where} cannot be read ({error}): run `verify` and re-extract the shard") from None
        image_id, view_index = int(metadata["image_id"][row]), int(metadata["view_index"][row])
        image_index, expected_view = divmod(index, self.manifest.n_views)
        if (image_id, view_index) != (self.manifest.image_ids[image_index], expected_view):
            raise StoreError(f"{where} is image {image_id} view {view_index}, the manifest says image "
                             f"{self.manifest.image_ids[image_index]} view {expected_view}: re-extract the shard")
        return Sample(index=index, image_id=image_id, view_index=view_index,
                      image_hw=(int(metadata["image_hw"][row, 0]), int(metadata["image_hw"][row, 1])),
                      features=features, statistics=statistics)

    def _read_parts(self, index: int, sizes: list[tuple[int, int]]) -> dict[str, np.ndarray]:
        """Every array part of sample ``index`` ("s{stride}/{part}" -> its values, maps cut to ``sizes``,
        one (h, w) per level), fetched concurrently in one trip to zarr's event loop instead of one
        blocking call per part."""
        selections = {}
        for (h, w), level in zip(sizes, self.manifest.levels):
            for part, (_, kind) in self.manifest.level_parts(level.stride).items():
                selections[f"s{level.stride}/{part}"] = (index, slice(None), slice(0, h), slice(0, w)) \
                    if kind == "map" else (index,)
        if self._direct:  # a local store: each part's chunk straight from its shard file (storage.zarr_direct)
            k, row = divmod(index, self.manifest.samples_per_shard)
            values = {}
            for name, selection in selections.items():
                region = (0, *selection[1:])
                path = self.location.path(f"{name}/{shard_key(self.arrays[name], k)}")
                values[name] = self._direct[name].read(path, row, region)
                if values[name] is None:  # no chunk stored there: zarr reads the fill value, zeros
                    values[name] = np.zeros(self._direct[name].chunk_shape, self.arrays[name].dtype)[region]
            return values

        async def gather() -> list:
            return await asyncio.gather(*(self.arrays[name].async_array.getitem(selection)
                                          for name, selection in selections.items()))
        return dict(zip(selections, sync(gather())))

    def _iter_shard(self, k: int):
        for index in self.manifest.shard_range(k):
            yield self.read(index)

    def _shard_metadata(self, k: int) -> dict[str, np.ndarray]:
        if k not in self._metadata:
            if len(self._metadata) >= self._CACHED_SHARDS:
                self._metadata.pop(next(iter(self._metadata)))
            span = self.manifest.shard_range(k)
            missing = [self.location.url(name) for name in self._shard_files(k) if not self.location.isfile(name)]
            if missing:
                raise StoreError(f"shard {k} of {self.root} lacks file {missing[0]} (samples {span.start}.."
                                 f"{span.stop - 1}): run `verify` and re-extract the shard")
            try:
                self._metadata[k] = {name: self.arrays[name][span.start: span.stop] for name in _METADATA}
            except Exception as error:
                raise StoreError(f"shard {k} of {self.root}: metadata cannot be read ({error}); "
                                 "run `verify` and re-extract the shard") from None
        return self._metadata[k]

    def _shard_files(self, k: int) -> list[str]:
        return sorted(shard_files(self.group, self.manifest, k))

    def _shard_sha256(self, k: int) -> str:
        return sha256_files(self.location, self._shard_files(k))

    def bytes_on_disk(self) -> dict:
        levels = {stride: self.location.tree_bytes(f"s{stride}") for stride in self.manifest.strides}
        return {"levels": levels, "total": self.location.tree_bytes()}
