"""Store safety: resume, refusal of another job's store, overwrite, verification, damaged and hostile files."""

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import zarr

from storage import StoreError, create_store, open_store
from storage.testing import tiny_manifest, tiny_samples, write_store

PATHS = {"zarr": "features.zarr", "wds": "features"}


@pytest.fixture(params=sorted(PATHS))
def fmt(request) -> str:
    return request.param


def shard_samples(manifest, samples, k):
    span = manifest.shard_range(k)
    return samples[span.start: span.stop]


def finished_store(tmp_path, fmt):
    manifest = tiny_manifest(fmt=fmt)
    path = str(tmp_path / PATHS[fmt])
    write_store(path, manifest, tiny_samples(manifest))
    return path


def test_resume_skips_completed_shards(tmp_path, fmt):
    manifest, path = tiny_manifest(fmt=fmt), str(tmp_path / PATHS[fmt])
    samples = tiny_samples(manifest)
    writer = create_store(path, manifest)
    assert writer.completed_shards() == set()
    for k in (0, 2):
        writer.write_shard(k, shard_samples(manifest, samples, k))
    with pytest.raises(StoreError, match="unfinished"):
        open_store(path)

    resumed = create_store(path, tiny_manifest(fmt=fmt))
    assert resumed.completed_shards() == {0, 2}
    with pytest.raises(StoreError, match=r"missing 2 of 4 shards \(1, 3\)"):
        resumed.finalize()
    for k in sorted(set(range(manifest.n_shards)) - resumed.completed_shards()):
        resumed.write_shard(k, shard_samples(manifest, samples, k))
    finalized = resumed.finalize()
    assert [record.index for record in finalized.shards] == [0, 1, 2, 3]
    reader = open_store(path)
    assert reader.verify_shards() == [] and reader.read(9).image_id == 15


def test_parallel_writers_fill_disjoint_shards(tmp_path, fmt):
    manifest, path = tiny_manifest(fmt=fmt), str(tmp_path / PATHS[fmt])
    samples = tiny_samples(manifest)
    lead = create_store(path, manifest)
    other = create_store(path, tiny_manifest(fmt=fmt))  # a second rank opens the created store
    for k in range(manifest.n_shards):
        (lead if k % 2 == 0 else other).write_shard(k, shard_samples(manifest, samples, k))
    lead.finalize()
    reader = open_store(path)
    assert [s.image_id for s in reader.iter_samples()] == [s.image_id for s in samples]


def test_shard_without_marker_is_rewritten(tmp_path, fmt):
    """A crash after the data files but before the marker leaves the shard absent; resume overwrites it."""
    manifest, path = tiny_manifest(fmt=fmt), str(tmp_path / PATHS[fmt])
    samples, wrong = tiny_samples(manifest), tiny_samples(manifest, seed=7)
    writer = create_store(path, manifest)
    writer.write_shard(1, shard_samples(manifest, wrong, 1))
    (Path(path) / "shards" / "000001.json").unlink()
    writer = create_store(path, manifest)
    assert writer.completed_shards() == set()
    for k in range(manifest.n_shards):
        writer.write_shard(k, shard_samples(manifest, samples, k))
    writer.finalize()
    reader = open_store(path)
    np.testing.assert_allclose(reader.read(4).features[8], samples[4].features[8], rtol=1e-3, atol=1e-3)
    assert reader.verify_shards() == []


def test_another_jobs_store_is_refused_unless_overwritten(tmp_path, fmt):
    path = finished_store(tmp_path, fmt)
    other = tiny_manifest(fmt=fmt, codec="int8")
    other.teacher["checkpoint_sha256"] = "9" * 64
    with pytest.raises(StoreError, match="pass --overwrite") as refused:
        create_store(path, other)
    assert "teacher.checkpoint_sha256" in str(refused.value) and "codec" in str(refused.value)
    writer = create_store(path, other, overwrite=True)
    assert writer.completed_shards() == set() and writer.manifest.codec == "int8"
    with pytest.raises(StoreError, match="unfinished"):
        open_store(path)


def test_paths_that_are_not_stores(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="holds no feature store"):
            create_store(str(tmp_path / "notes"), tiny_manifest(fmt="wds"), overwrite=overwrite)
    assert (tmp_path / "notes" / "keep.txt").exists()
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        create_store(str(tmp_path / "file.zarr"), tiny_manifest())
    with pytest.raises(StoreError, match="no feature store at .*run `pkd-offline extract` first"):
        open_store(str(tmp_path / "missing.zarr"))


def test_samples_out_of_place_are_refused(tmp_path, fmt):
    manifest = tiny_manifest(fmt=fmt)
    samples = tiny_samples(manifest)
    writer = create_store(str(tmp_path / PATHS[fmt]), manifest)
    with pytest.raises(StoreError, match="needs 3 samples"):
        writer.write_shard(0, samples[:2])
    with pytest.raises(StoreError, match="out of place"):
        writer.write_shard(0, [samples[1], samples[0], samples[2]])
    samples[0].features[8] = samples[0].features[8][:2]
    with pytest.raises(StoreError, match="stride 8 map has shape"):
        writer.write_shard(0, samples[:3])
    samples[1].features[16][0, 0, 0] = np.nan
    with pytest.raises(StoreError, match="NaN"):
        writer.write_shard(0, [tiny_samples(manifest)[0], samples[1], samples[2]])
    assert writer.completed_shards() == set()


def flip_byte(path: str, offset_from_end: int = 100) -> None:
    with open(path, "r+b") as handle:
        handle.seek(max(0, os.path.getsize(path) - offset_from_end))
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x01]))


def test_verify_names_a_bit_flipped_and_a_truncated_shard(tmp_path, fmt):
    path = finished_store(tmp_path, fmt)
    reader = open_store(path)
    flip_byte(reader.shard_paths(1)[-1])
    truncated = reader.shard_paths(3)[0]
    os.truncate(truncated, os.path.getsize(truncated) // 2)
    os.remove(reader.shard_paths(2)[0])
    problems = open_store(path).verify_shards()
    assert len(problems) == 3
    assert problems[0].startswith("shard 1: sha256") and problems[2].startswith("shard 3: sha256")
    assert problems[1].startswith("shard 2: missing file")


def test_truncated_tar_is_a_store_error_naming_the_shard(tmp_path):
    path = finished_store(tmp_path, "wds")
    tar = Path(path) / "shard-000001.tar"
    os.truncate(tar, os.path.getsize(tar) // 2)
    reader = open_store(path)
    with pytest.raises(StoreError, match="shard-000001.tar"):
        list(reader.iter_samples([1]))
    with pytest.raises(StoreError, match="shard-000001.tar"):
        reader.read(5)


@pytest.mark.parametrize("member", ["000000003.evil.pickle", "000000003.state.pth", "000000003.x.pkl"])
def test_pickle_members_are_refused(tmp_path, member):
    path = finished_store(tmp_path, "wds")
    tar = Path(path) / "shard-000001.tar"
    with tarfile.open(tar, "a") as archive:
        info = tarfile.TarInfo(member)
        info.size = 4
        archive.addfile(info, io.BytesIO(b"\x80\x04N."))
    reader = open_store(path)
    with pytest.raises(StoreError, match="pickle"):
        list(reader.iter_samples([1]))
    with pytest.raises(StoreError, match="pickle"):
        reader.read(4)


def test_pickled_npy_member_is_refused(tmp_path):
    path = finished_store(tmp_path, "wds")
    tar = Path(path) / "shard-000000.tar"
    members = {}
    with tarfile.open(tar) as archive:
        for info in archive.getmembers():
            members[info.name] = archive.extractfile(info).read()
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    members["000000000.s8.values.npy"] = buffer.getvalue()
    del members["000000000.s8.values.npy.zst"]
    with tarfile.open(tar, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    with pytest.raises(StoreError, match="not a plain numeric .npy"):
        open_store(path).read(0)


def test_object_dtype_zarr_array_is_refused(tmp_path):
    path = finished_store(tmp_path, "zarr")
    group = zarr.open_group(path, mode="r+")
    shape = group["image_id"].shape
    del group["image_id"]
    group.create_array("image_id", shape=shape, dtype=str)
    with pytest.raises(StoreError, match="object and string dtypes are refused"):
        open_store(path)
