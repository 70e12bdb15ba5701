"""Direct chunk reads of local zarr stores (storage.zarr_direct): the values zarr itself reads, and a damaged
shard file is a read error, as it is through zarr."""

from __future__ import annotations

import numpy as np
import pytest

from storage import StoreError, open_store
from storage.testing import tiny_manifest, tiny_samples, write_store
from storage.zarr_store import shard_key


def _store(tmp_path, codec: str):
    manifest = tiny_manifest(codec=codec)
    path = tmp_path / "f.zarr"
    write_store(str(path), manifest, tiny_samples(manifest))
    return path


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8", "pca"])
def test_direct_reads_give_every_value_zarr_reads(tmp_path, codec):
    path = _store(tmp_path, codec)
    direct, through_zarr = open_store(str(path)), open_store(str(path))
    assert set(direct._direct) == {name for name in direct.arrays if name.startswith("s")}
    through_zarr._direct = {}
    for keep_encoded in (False, True):
        direct.keep_encoded = through_zarr.keep_encoded = keep_encoded
        for index in range(direct.manifest.n_samples):
            mine, theirs = direct.read(index), through_zarr.read(index)
            assert (mine.image_id, mine.view_index, mine.image_hw) == (theirs.image_id, theirs.view_index,
                                                                       theirs.image_hw)
            for stride, features in theirs.features.items():
                if keep_encoded:
                    assert mine.features[stride].parts.keys() == features.parts.keys()
                    for name, values in features.parts.items():
                        part = mine.features[stride].parts[name]
                        assert part.flags.c_contiguous and part.flags.writeable  # as zarr's reads are
                        np.testing.assert_array_equal(part, values)
                else:
                    np.testing.assert_array_equal(mine.features[stride], features)


def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["index", "chunk"])
def test_a_damaged_shard_file_is_a_read_error_never_other_values(tmp_path, where):
    path = _store(tmp_path, "int8")
    store = open_store(str(path))
    array = store.arrays["s8/q"]
    shard_file = path / "s8" / "q" / shard_key(array, 0)
    offset, length = (int(v) for v in store._direct["s8/q"]._index(str(shard_file))[1])
    _flip(shard_file, shard_file.stat().st_size - 10 if where == "index" else offset + length // 2)
    damaged = open_store(str(path))
    assert damaged._direct
    with pytest.raises(StoreError, match="cannot be read") as error:
        damaged.read(1)
    assert "\n" not in str(error.value)


def test_arrays_not_laid_out_as_the_writer_lays_them_out_are_read_through_zarr():
    from storage.zarr_direct import ChunkFile

    good = {"data_type": "int8", "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [3, 4, 5, 6]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": [1, 4, 5, 6], "index_location": "end",
                "codecs": [{"name": "bytes"}, {"name": "zstd", "configuration": {"level": 3, "checksum": True}}],
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]}}]}
    assert ChunkFile.for_array(good).chunks_per_shard == 3
    def sharded(**changes) -> dict:
        return {**good, "codecs": [{"name": "sharding_indexed",
                                    "configuration": {**good["codecs"][0]["configuration"], **changes}}]}
    for broken in ({**good, "data_type": "float32"},  # multi-byte values need an explicit little-endian bytes codec
                   sharded(index_location="start"), sharded(chunk_shape=[1, 4, 5, 3]),
                   {**good, "codecs": [{"name": "bytes"}, {"name": "zstd"}]},
                   {**good, "chunk_key_encoding": {"name": "v2"}}, {}):
        assert ChunkFile.for_array(broken) is None
