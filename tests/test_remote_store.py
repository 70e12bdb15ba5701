"""Stores on object storage: the same create/open/write/read/verify calls with ``s3://`` URLs, against a real
S3-compatible server (moto) on the loopback interface, configured only through the standard AWS environment."""

import json

import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from storage import StoreError, create_store, describe, open_store  # noqa: E402
from storage.testing import tiny_manifest, tiny_samples, write_store  # noqa: E402

from loopback_s3 import loopback_s3  # noqa: E402

BUCKET = "pkd-test"
NAMES = {"zarr": "features.zarr", "wds": "shards/"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An empty bucket on a moto server at 127.0.0.1; yields an s3fs filesystem for inspecting objects."""
    with loopback_s3(BUCKET, tmp_path_factory.mktemp("aws")) as fs:
        yield fs


@pytest.fixture(params=sorted(NAMES))
def fmt(request) -> str:
    return request.param


def remote_url(request, fmt: str) -> str:
    """A fresh store URL per test (the bucket is shared by the module)."""
    return f"s3://{BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}/{NAMES[fmt]}"


def shard(manifest, samples, k):
    span = manifest.shard_range(k)
    return samples[span.start: span.stop]


def test_round_trip_on_s3_equals_the_local_store(s3, tmp_path, request, fmt):
    manifest = tiny_manifest(fmt=fmt)
    samples = tiny_samples(manifest)
    url = remote_url(request, fmt)
    write_store(url, manifest, samples)
    write_store(str(tmp_path / NAMES[fmt]), manifest, samples)
    remote, local = open_store(url), open_store(str(tmp_path / NAMES[fmt]))
    assert s3.isfile(f"{url}manifest.json" if url.endswith("/") else f"{url}/manifest.json")
    assert all(path.startswith(f"s3://{BUCKET}/") for path in remote.shard_paths(2))
    summary, local_summary = describe(remote), describe(local)
    assert summary["digest"] == local_summary["digest"]
    assert summary["levels"] == local_summary["levels"] and summary["bytes_total"] > 0
    assert [record.sha256 for record in remote.manifest.shards] == [record.sha256 for record in local.manifest.shards]
    for index in (0, 4, 9):
        stored = remote.read(index)
        assert (stored.image_id, stored.view_index, stored.image_hw) == (samples[index].image_id,
                                                                         samples[index].view_index,
                                                                         samples[index].image_hw)
        np.testing.assert_array_equal(stored.features[16], local.read(index).features[16])
    assert [s.index for s in remote.iter_samples([2])] == [6, 7, 8]
    assert remote.verify_shards() == []


def test_resume_reads_completion_markers_from_s3(s3, request, fmt):
    manifest = tiny_manifest(fmt=fmt)
    samples = tiny_samples(manifest)
    url = remote_url(request, fmt)
    writer = create_store(url, manifest)
    assert writer.completed_shards() == set()
    writer.write_shard(0, shard(manifest, samples, 0))
    # A second writer (another rank) on the same store: each sees the other's markers.
    other = create_store(url, manifest)
    other.write_shard(2, shard(manifest, samples, 2))
    assert writer.completed_shards() == {0, 2} == other.completed_shards()
    marker = json.loads(s3.cat_file(f"{url.rstrip('/')}/shards/000002.json"))
    assert marker["index"] == 2 and marker["samples"] == 3
    with pytest.raises(StoreError, match="unfinished"):
        open_store(url)
    with pytest.raises(StoreError, match=r"missing 2 of 4 shards \(1, 3\)"):
        writer.finalize()
    resumed = create_store(url, manifest)
    assert resumed.completed_shards() == {0, 2}
    for k in (1, 3):
        resumed.write_shard(k, shard(manifest, samples, k))
    assert [record.index for record in resumed.finalize().shards] == [0, 1, 2, 3]
    reader = open_store(url)
    assert reader.verify_shards() == [] and reader.read(9).image_id == 15
    with pytest.raises(StoreError, match="pass --overwrite"):
        create_store(url, tiny_manifest(fmt=fmt, codec="int8"))
    fresh = create_store(url, tiny_manifest(fmt=fmt, codec="int8"), overwrite=True)
    assert fresh.completed_shards() == set() and not s3.exists(f"{url.rstrip('/')}/shards/000000.json")


def test_verify_names_a_corrupted_and_a_missing_object(s3, request, fmt):
    manifest = tiny_manifest(fmt=fmt)
    url = remote_url(request, fmt)
    write_store(url, manifest, tiny_samples(manifest))
    reader = open_store(url)
    corrupted = reader.shard_paths(1)[-1]
    data = bytearray(s3.cat_file(corrupted))
    data[len(data) // 2] ^= 0x40
    s3.pipe_file(corrupted, bytes(data))
    s3.rm_file(reader.shard_paths(3)[0])
    problems = open_store(url).verify_shards()
    assert len(problems) == 2, problems
    assert problems[0].startswith("shard 1: sha256") and "s3://" in problems[0]
    assert problems[1] == f"shard 3: missing file {reader.shard_paths(3)[0]}; re-extract the shard"
    with pytest.raises(StoreError, match="shard 3|shard-000003"):
        open_store(url).read(9)


def test_file_urls_and_plain_paths_name_the_same_store(tmp_path, fmt):
    manifest = tiny_manifest(fmt=fmt)
    samples = tiny_samples(manifest)
    write_store(f"file://{tmp_path}/{NAMES[fmt]}", manifest, samples)
    write_store(str(tmp_path / "plain" / NAMES[fmt]), manifest, samples)
    by_path = open_store(str(tmp_path / NAMES[fmt]))
    assert by_path.verify_shards() == [] and by_path.shard_paths(0)[0].startswith(str(tmp_path))
    assert describe(by_path)["digest"] == describe(open_store(str(tmp_path / "plain" / NAMES[fmt])))["digest"]


def test_missing_store_on_s3_is_a_store_error(s3):
    with pytest.raises(StoreError, match=f"no feature store at s3://{BUCKET}/absent.zarr"):
        open_store(f"s3://{BUCKET}/absent.zarr")
    with pytest.raises(StoreError, match="cannot write the store at s3://no-such-bucket/f.zarr .*AWS_ENDPOINT_URL"):
        create_store("s3://no-such-bucket/f.zarr", tiny_manifest())


@pytest.mark.parametrize("codec", ["fp16", "pca"])  # pca: its basis file travels through the object store too
def test_extract_to_s3_then_train_from_it(s3, synth_data, tmp_path, codec):
    from stages.extract import ExtractConfig, extract
    from stages.train import TrainConfig, train

    url = f"s3://{BUCKET}/end-to-end-{codec}/f.zarr"
    out = extract(ExtractConfig(teacher="swin", random_init=True, variant="tiny", data=synth_data, out=url, views=2,
                                short_side=128, max_size=128, batch_size=4, workers=0, samples_per_shard=4,
                                progress=False, codec=codec))
    assert out == url
    store = open_store(url)
    assert len(store) == 16 and store.manifest.n_shards == 4 and store.verify_shards() == []
    assert s3.isfile(f"{url}/shards/000003.json") and s3.isfile(f"{url}/manifest.json")
    assert s3.isfile(f"{url}/codec_side.npz") == (codec == "pca")
    run = tmp_path / "run"
    model = train(TrainConfig(student="retinanet", backbone="resnet18", data=synth_data, out=run, iters=1,
                              features=url, variant="tiny", short_side=128, max_size=128, batch_size=4, workers=0,
                              progress=False, optimizer="adamw", lr=1e-3, warmup_iters=1, val_split=None))
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert model.is_file() and len(log) == 1 and log[0]["loss_pkd"] > 0
