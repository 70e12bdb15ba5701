"""Both store formats with every codec: ragged maps and two views round trip, sizes, digests."""

import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import zarr

from storage import CODECS, StoreError, describe, detect_format, open_store
from storage.testing import tiny_manifest, tiny_samples, write_store

FORMATS = {"zarr": "features.zarr", "wds": "features"}


def make_store(tmp_path, fmt, codec="fp16", seed=0, **manifest_options):
    manifest = tiny_manifest(fmt=fmt, codec=codec, **manifest_options)
    samples = tiny_samples(manifest, seed=seed)
    path = str(tmp_path / f"{codec}-{manifest.samples_per_shard}-{FORMATS[fmt]}")
    write_store(path, manifest, samples)
    return path, samples


def assert_same_sample(stored, original, codec, reader=None):
    assert (stored.index, stored.image_id, stored.view_index) == (original.index, original.image_id,
                                                                  original.view_index)
    assert stored.image_hw == original.image_hw
    assert sorted(stored.features) == sorted(original.features)
    for stride, features in original.features.items():
        decoded = stored.features[stride]
        assert decoded.dtype == np.float32 and decoded.shape == features.shape
        codec_of_level = reader.level_codecs[stride] if reader is not None else CODECS[codec]
        assert np.abs(decoded - features).max() <= codec_of_level.error_bound(features)


@pytest.mark.parametrize("codec", sorted(CODECS))
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_round_trip(tmp_path, fmt, codec):
    path, samples = make_store(tmp_path, fmt, codec)
    reader = open_store(path)
    assert len(reader) == len(samples) == 10 and reader.manifest.n_shards == 4
    assert len({sample.features[8].shape for sample in samples}) > 1, "maps must be ragged"
    for stored, original in zip(reader.iter_samples(), samples, strict=True):
        assert_same_sample(stored, original, codec, reader)
    for index in (7, 0, 9, 3):
        assert_same_sample(reader.read(index), samples[index], codec, reader)
    assert [s.index for s in reader.iter_samples([2])] == [6, 7, 8]
    assert reader.index_of(image_id=14, view_index=1) == 7
    assert reader.verify_shards() == []


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_bad_lookups_are_store_errors(tmp_path, fmt):
    reader = open_store(make_store(tmp_path, fmt)[0])
    with pytest.raises(StoreError, match="sample 10 is out of range"):
        reader.read(10)
    with pytest.raises(StoreError, match="image 99 is not in the store"):
        reader.index_of(99, 0)
    with pytest.raises(StoreError, match="view 2"):
        reader.index_of(11, 2)


def test_digest_depends_on_content_only(tmp_path):
    digests = {(fmt, per_shard): describe(open_store(make_store(tmp_path, fmt, samples_per_shard=per_shard)[0]))
               ["digest"] for fmt in FORMATS for per_shard in (2, 3)}
    assert len(set(digests.values())) == 1, digests
    other = make_store(tmp_path / "other", "zarr", seed=1)[0]
    assert describe(open_store(other))["digest"] not in digests.values()


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_int8_stores_a_quarter_of_fp32_or_less(tmp_path, fmt):
    options = dict(image_ids=[1, 2], n_views=1, strides=(8,), channels=32, max_image_hw=(384, 512),
                   samples_per_shard=2)
    summary = describe(open_store(make_store(tmp_path, fmt, "int8", **options)[0]))
    level = summary["levels"][8]
    assert summary["samples"] == 2 and summary["codec"] == "int8" and summary["format"] == fmt
    assert level["channels"] == 32 and level["fp32_bytes_per_image"] > 0
    assert level["compression_ratio_vs_fp32"] >= 3.9, level  # measured 4.1-4.2
    assert level["bytes_per_image"] * 2 == level["bytes_on_disk"] <= summary["bytes_total"]
    assert summary["bytes_per_image"] == level["bytes_per_image"]


def test_wds_extras_round_trip_and_shards_are_plain_webdataset_tars(tmp_path):
    manifest = tiny_manifest(fmt="wds", image_ids=[1, 2], samples_per_shard=4)
    samples = tiny_samples(manifest)
    for sample in samples:
        sample.extras = {"jpg": b"\xff\xd8 image %d" % sample.image_id, "boxes.json": b"[[1, 2, 3, 4]]"}
    path = tmp_path / "store"
    write_store(str(path), manifest, samples)
    reader = open_store(str(path))
    assert reader.read(2).extras == samples[2].extras
    assert [s.extras["jpg"] for s in reader.iter_samples()] == [s.extras["jpg"] for s in samples]
    with tarfile.open(path / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert "000000000.meta.json" in names and "000000000.s16.values.npy.zst" in names
    import webdataset  # only here: it imports torch

    first = next(iter(webdataset.WebDataset(str(path / "shard-000000.tar"), shardshuffle=False)))
    assert first["__key__"] == "000000000" and json.loads(first["meta.json"])["image_id"] == 1
    # The writer (tarfile) gives the very bytes webdataset's own TarWriter gives for the same samples.
    with tarfile.open(path / "shard-000000.tar") as tar:
        members = [(info.name.split(".", 1), tar.extractfile(info).read()) for info in tar.getmembers()]
    rewritten = tmp_path / "rewritten.tar"
    with open(rewritten, "wb") as handle, webdataset.TarWriter(handle, encoder=False, mtime=0) as writer:
        for key in dict.fromkeys(key for (key, _), _ in members):
            writer.write({"__key__": key, **{name: data for (k, name), data in members if k == key}})
    assert rewritten.read_bytes() == (path / "shard-000000.tar").read_bytes()


def test_zarr_store_is_readable_by_zarr_alone(tmp_path):
    path, samples = make_store(tmp_path, "zarr")
    group = zarr.open_group(path, mode="r")
    assert group["s8/values"].shape == (10, 4, 8, 10) and group["s8/values"].dtype == np.float16
    assert list(group["image_id"][:4]) == [11, 11, 12, 12]
    h, w = group["feature_hw"][3, 0]
    np.testing.assert_allclose(group["s8/values"][3, :, :h, :w], samples[3].features[8], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_reading_needs_no_torch(tmp_path, fmt):
    path = make_store(tmp_path, fmt)[0]
    code = ("import sys; from storage import open_store; r = open_store(sys.argv[1]); r.read(3); "
            "list(r.iter_samples()); assert 'torch' not in sys.modules and 'pkd_offline' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, path], check=True)


def test_detect_format():
    assert detect_format("out/features.zarr") == "zarr"
    assert detect_format("out/features.zarr/") == "zarr"
    assert detect_format("out/features") == "wds"
    assert detect_format("out/features.zarr", fmt="wds") == "wds"
    with pytest.raises(StoreError, match="unknown store format"):
        detect_format("x", fmt="hdf5")


IMPORT_PROBE = r'''
import json, sys, tempfile
baseline = set(sys.modules)
import zarr
by_zarr = set(sys.modules) - baseline  # zarr's own imports (numpy, fsspec, donfig, ...): not storage's doing
from storage import open_store
from storage.testing import tiny_manifest, tiny_samples, write_store
with tempfile.TemporaryDirectory() as tmp:
    for fmt, name in (("zarr", "f.zarr"), ("wds", "f")):
        manifest = tiny_manifest(fmt=fmt, codec="int8")
        write_store(f"{tmp}/{name}", manifest, tiny_samples(manifest))
        store = open_store(f"{tmp}/{name}")
        assert len(list(store.iter_samples())) == len(store) == 10 and store.read(3).index == 3
        assert store.verify_shards() == []
top = lambda names: {name.split(".")[0] for name in names if not name.startswith("_cython_")}  # Cython runtimes
print(json.dumps({"all": sorted(top(sys.modules)), "beyond_zarr": sorted(top(set(sys.modules) - baseline - by_zarr)
                                                                      - set(sys.stdlib_module_names))}))
'''


def test_writing_and_reading_a_store_loads_no_training_code():
    """README: storage imports numpy, zarr (which loads fsspec), numcodecs, fsspec and the standard library;
    writing and reading either format never loads torch, webdataset or the training code."""
    result = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert not {"torch", "webdataset", "torchvision", "PIL", "pkd_offline", "stages"} & set(modules["all"])
    assert {"numpy", "fsspec"} <= set(modules["all"])
    # zarrs (a codec pipeline for zarr), where installed, is loaded by zarr's own plugin registry on first use
    assert set(modules["beyond_zarr"]) <= {"storage", "numcodecs", "numpy", "fsspec", "zarrs"}, modules["beyond_zarr"]
