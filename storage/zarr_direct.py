"""Direct reads of one sample's chunk from a local zarr v3 shard file, without zarr's async read path.

A ``ZarrReader`` reads a sample as one inner chunk of every array part (an int8 level has three: ``q``,
``scale``, ``offset``). Through zarr each read is a trip through its event loop and codec pipeline; this module
reads the same bytes from the shard file itself, the way zarr's ``ShardingCodec`` lays them out (zarr v3
specification, sharding_indexed, index at the end):

- the shard file ends with its index: per inner chunk two little-endian uint64 (offset, length),
  ``2**64 - 1`` twice for an absent chunk, then the index's crc32c (4 bytes, little-endian);
- an inner chunk is a zstd frame of the chunk's values in C order, little-endian.

Only arrays whose metadata is exactly that layout (the one ``ZarrWriter`` creates) get a direct reader
(``ChunkFile.for_array`` returns None otherwise, and the caller reads through zarr). The index's crc32c
is checked and every zstd frame carries a content checksum that decompression checks, so a damaged
file fails here as it does in zarr: with an error, never with different values.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import google_crc32c
import numpy as np
from numcodecs import Zstd

EMPTY = 2 ** 64 - 1


class ChunkFile:
    """Inner chunks of one array's shard files: ``read(path, row, region)`` -> that region of the chunk at ``row``
    of the shard (a chunk has shape ``chunk_shape``), a new writable array, or None where the shard holds no
    chunk there."""

    _CACHED_INDEXES = 64  # shard files whose index is kept (16 bytes a chunk)

    def __init__(self, dtype: np.dtype, chunk_shape: tuple[int, ...], chunks_per_shard: int) -> None:
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.chunk_shape = tuple(chunk_shape)
        self.chunks_per_shard = chunks_per_shard
        self._indexes: OrderedDict[str, np.ndarray] = OrderedDict()
        self._zstd = Zstd()

    @classmethod
    def for_array(cls, metadata: dict) -> ChunkFile | None:
        """A reader for an array of zarr v3 metadata ``metadata`` (its ``zarr.json`` as a dict) if it is sharded
        along the first axis only, index at the end with bytes (little) + crc32c, inner chunks bytes + zstd;
        else None."""
        try:
            codecs = metadata["codecs"]
            if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
                return None
            config = codecs[0]["configuration"]
            inner, index = config["codecs"], config["index_codecs"]
            shard_shape = metadata["chunk_grid"]["configuration"]["chunk_shape"]
            chunk_shape = config["chunk_shape"]
            dtype = np.dtype(metadata["data_type"])
        except (KeyError, TypeError, IndexError, ValueError):
            return None
        little = {"name": "bytes"}, {"name": "bytes", "configuration": {"endian": "little"}}
        if (config.get("index_location", "end") != "end" or len(inner) != 2 or inner[0] not in little
                or inner[1].get("name") != "zstd" or index != [little[1], {"name": "crc32c"}]
                or (dtype.itemsize > 1 and inner[0] != little[1]) or dtype.kind not in "biuf"
                or list(shard_shape[1:]) != list(chunk_shape[1:]) or chunk_shape[0] != 1
                or metadata.get("chunk_key_encoding") != {"name": "default", "configuration": {"separator": "/"}}):
            return None
        return cls(dtype, tuple(chunk_shape), int(shard_shape[0]))

    def _index(self, path: str) -> np.ndarray:
        index = self._indexes.get(path)
        if index is None:
            size = 16 * self.chunks_per_shard + 4
            with open(path, "rb") as handle:
                handle.seek(-size, os.SEEK_END)
                raw = handle.read(size)
            if len(raw) != size:
                raise ValueError(f"{path} is shorter than its shard index")
            if np.uint32(google_crc32c.value(raw[:-4])).tobytes() != raw[-4:]:
                raise ValueError(f"{path}: the shard index fails its crc32c")
            index = np.frombuffer(raw[:-4], dtype="<u8").reshape(self.chunks_per_shard, 2)
            self._indexes[path] = index
            if len(self._indexes) > self._CACHED_INDEXES:
                self._indexes.popitem(last=False)
        return index

    def read(self, path: str, row: int, region: tuple = ()) -> np.ndarray | None:
        """``region`` (an index into the chunk, e.g. ``(0, slice(None), slice(0, h), slice(0, w))``) of the inner
        chunk at ``row`` of shard file ``path``, as a new contiguous array; None where no chunk is stored."""
        offset, length = (int(v) for v in self._index(path)[row])
        if offset == EMPTY and length == EMPTY:
            return None
        with open(path, "rb") as handle:
            handle.seek(offset)
            frame = handle.read(length)
        if len(frame) != length:
            raise ValueError(f"{path}: chunk {row} runs past the end of the file")
        raw = self._zstd.decode(frame)
        values = np.frombuffer(raw, dtype=self.dtype)
        if values.size != int(np.prod(self.chunk_shape)):
            raise ValueError(f"{path}: chunk {row} holds {values.size} values, not {self.chunk_shape}")
        return np.array(values.reshape(self.chunk_shape)[region], dtype=self.dtype.newbyteorder("="))
