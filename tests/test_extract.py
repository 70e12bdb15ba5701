import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import stages.extract
from pkd_offline.extraction.encode import finish, launch_encode
from pkd_offline.extraction.teacher_maps import teacher_levels
from pkd_offline.extraction.writers import ShardWriterThread
from pkd_offline.checkpoint import save_checkpoint
from pkd_offline.data import CocoDetection
from pkd_offline.errors import PkdError
from pkd_offline.views import View, make_views
from pkd_offline.projection import project_image
from pkd_offline.pyramid import level_size
from stages.extract import ExtractConfig, extract
from pkd_offline.teachers import load_teacher
from stages.verify import VerifyConfig, verify
from storage import CODECS, StoreError, describe, open_store
from storage.testing import killed_copy


def config(data: Path, out: Path, **overrides) -> ExtractConfig:
    settings = dict(teacher="swin", random_init=True, variant="tiny", data=data, split="train", out=out,
                    views=2, short_side=128, max_size=128, batch_size=4, workers=0, samples_per_shard=4,
                    progress=False)
    return ExtractConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def teacher(synth_data):
    model, _ = load_teacher("swin", checkpoint=None, random_init=True, variant="tiny", num_classes=7, seed=0)
    return model


@pytest.mark.parametrize("store_name,codec", [("f.zarr", "fp16"), ("f.zarr", "int8"), ("wds", "fp16"), ("wds", "int8")])
def test_round_trip_matches_teacher_within_codec_bound(synth_data, tmp_path, teacher, store_name, codec):
    path = extract(config(synth_data, tmp_path / store_name, codec=codec))
    store = open_store(str(path))
    assert len(store) == 8 * 2 and store.manifest.format == ("zarr" if store_name.endswith(".zarr") else "wds")
    views = make_views(2, 128, 128)
    dataset = CocoDetection(synth_data, "train", views)
    heights = set()
    for index in (0, 3, 6, 13):
        sample = store.read(index)
        item = dataset[divmod(index, 2)]
        heights.add(item["image_hw"][0])
        assert sample.image_hw == item["image_hw"] and sample.view_index == index % 2
        with torch.inference_mode():
            fresh, _ = teacher.features([item["image"]])
        for stride, stored in sample.features.items():
            expected = fresh[stride][0].numpy()
            assert stored.shape == expected.shape
            assert np.abs(stored - expected).max() <= CODECS[codec].error_bound(expected) + 1e-5
            assert np.corrcoef(stored.ravel(), expected.ravel())[0, 1] > 0.999
    assert heights == {96, 128}, "ragged image sizes must be covered"


def test_levels_flag_keeps_only_those_strides_and_manifest_names_them(synth_data, tmp_path):
    store = open_store(str(extract(config(synth_data, tmp_path / "f.zarr", levels="3,4", views=1))))
    manifest = store.manifest
    assert [(level.stride, level.channels) for level in manifest.levels] == [(8, 64), (16, 64)]
    assert manifest.teacher == {"name": "swin", "variant": "tiny", "random_init_seed": 0}
    assert manifest.dataset["split"] == "train" and len(manifest.dataset["annotation_sha256"]) == 64
    assert manifest.views == [View(128, 128).to_dict()]
    assert manifest.normalization["mean"] == pytest.approx([0.485, 0.456, 0.406])


@pytest.mark.parametrize("store_name", ["f.zarr", "wds"])
def test_resumed_extraction_equals_uninterrupted(synth_data, tmp_path, store_name):
    full = extract(config(synth_data, tmp_path / "full" / store_name))
    expected = describe(open_store(str(full)))["digest"]
    # The state a kill leaves: two shards finished, one half written, the manifest unfinished.
    killed = killed_copy(full, tmp_path / "killed" / store_name, unfinished_shards=(2, 3))
    shard_files = sorted(p for p in killed.rglob("*") if p.is_file() and "shards" not in p.parts and p.name != "manifest.json")
    untouched = {p: p.stat().st_mtime_ns for p in shard_files}
    # What a kill inside a write leaves: the atomic writes' temporary files, here full of junk.
    uuid = "0123456789abcdef0123456789abcdef"
    leftovers = [killed / "shards" / f".000002.json.{uuid}.tmp", killed / f".manifest.json.{uuid}.tmp"]
    if store_name == "wds":
        leftovers.append(killed / f".shard-000002.tar.{uuid}.tmp")  # storage.files.staged_file
    else:
        leftovers.append(killed / "s8" / "values" / "c" / "2" / "0" / "0" / f"0.{uuid}.partial")  # zarr's LocalStore
    for leftover in leftovers:
        leftover.write_bytes(b"torn write " * 100)
    with pytest.raises(StoreError, match="unfinished"):
        open_store(str(killed))
    extract(config(synth_data, killed))
    assert describe(open_store(str(killed)))["digest"] == expected
    resumed = open_store(str(killed))
    assert resumed.verify_shards() == [] and len(list(resumed.iter_samples())) == 16
    assert all(leftover.exists() for leftover in leftovers), "leftovers are ignored, not read"
    rewritten = [p for p, mtime in untouched.items() if p.exists() and p.stat().st_mtime_ns != mtime]
    assert rewritten, "the unfinished shards must be written again"
    assert len(rewritten) < len(untouched), "finished shards must not be redone"


@pytest.mark.parametrize("store_name", ["f.zarr", "wds"])
def test_several_shard_writer_threads_write_the_same_store(synth_data, tmp_path, store_name, monkeypatch):
    one = extract(config(synth_data, tmp_path / "one" / store_name))
    threads = []
    original = ShardWriterThread.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        threads.append(self)
    monkeypatch.setattr(stages.extract, "default_writer_threads", lambda: 3)
    monkeypatch.setattr(ShardWriterThread, "__init__", spy)
    three = extract(config(synth_data, tmp_path / "three" / store_name))
    assert threads[0].writers == 3 and threads[0].written == open_store(str(three)).manifest.n_shards == 4
    assert describe(open_store(str(three)))["digest"] == describe(open_store(str(one)))["digest"]
    assert open_store(str(three)).verify_shards() == []


def test_a_failing_shard_write_stops_extraction_with_its_error(synth_data, tmp_path, monkeypatch):
    from storage.zarr_store import ZarrWriter

    def broken(self, shard_index, samples):
        raise StoreError(f"disk full at shard {shard_index}")
    monkeypatch.setattr(stages.extract, "default_writer_threads", lambda: 2)
    monkeypatch.setattr(ZarrWriter, "_write_shard_files", broken)
    with pytest.raises(StoreError, match="disk full at shard"):
        extract(config(synth_data, tmp_path / "f.zarr"))


def test_store_of_another_teacher_is_refused_without_overwrite(synth_data, tmp_path):
    out = tmp_path / "f.zarr"
    extract(config(synth_data, out, views=1))
    with pytest.raises(StoreError, match="overwrite"):
        extract(config(synth_data, out, views=1, seed=1))
    extract(config(synth_data, out, views=1, seed=1, overwrite=True))
    assert open_store(str(out)).manifest.teacher["random_init_seed"] == 1


def test_corrupt_image_is_named_or_skipped_and_counted(synth_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    dataset = CocoDetection(data, "train", [View(128, 128)])
    bad = dataset.image_file(dataset.image_ids[2])
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(PkdError, match=bad.name):
        extract(config(data, tmp_path / "stop.zarr", views=1))
    store = open_store(str(extract(config(data, tmp_path / "skip.zarr", views=1, on_error="skip"))))
    assert [entry["image_id"] for entry in store.manifest.skipped] == [dataset.image_ids[2]]
    assert len(store) == 7


def test_nan_features_are_refused_with_the_image_named(synth_data, tmp_path):
    model, _ = load_teacher("swin", checkpoint=None, random_init=True, variant="tiny", num_classes=7)
    state = model.state_dict()
    state["detector.backbone.fpn.layer_blocks.0.0.bias"][0] = float("nan")
    save_checkpoint(tmp_path / "nan.pt", {"spec": model.spec, "model": state})
    with pytest.raises(PkdError, match=r"image \d+ .*NaN"):
        extract(config(synth_data, tmp_path / "f.zarr", random_init=False, checkpoint=tmp_path / "nan.pt"))
    with pytest.raises(StoreError, match="unfinished"):
        open_store(str(tmp_path / "f.zarr"))


@pytest.mark.parametrize("store_name,codec", [("f.zarr", "fp16"), ("wds", "int8"), ("f.zarr", "int2")])
def test_verify_passes_on_fresh_stores_and_fails_on_a_damaged_one(synth_data, tmp_path, store_name, codec):
    path = extract(config(synth_data, tmp_path / store_name, codec=codec))
    report = verify(VerifyConfig(store=path, data=synth_data, samples=3))
    assert report["ok"], report["text"]
    assert all(level["min_r"] >= report["threshold"] for level in report["levels"].values())
    victim = max((p for p in path.rglob("*") if p.is_file() and "shards" not in p.parts and p.name != "manifest.json"),
                 key=lambda p: p.stat().st_size)
    content = bytearray(victim.read_bytes())
    content[len(content) // 2] ^= 0xFF
    victim.write_bytes(bytes(content))
    assert open_store(str(path)).verify_shards(), "a flipped byte must be found"
    damaged = verify(VerifyConfig(store=path, data=synth_data, samples=16))
    assert not damaged["ok"] and "shard" in damaged["text"]


@pytest.mark.parametrize("store_name,codec", [("f.zarr", "fp16"), ("wds", "int8"), ("f.zarr", "int4")])
def test_verify_recomputation_fails_on_a_shard_of_other_features_with_a_valid_hash(synth_data, tmp_path, store_name,
                                                                                    codec):
    """A shard rewritten with another teacher's features, its sha256, marker and manifest record made consistent:
    the hashes pass, and only the recomputation with the store's teacher finds it."""
    path = extract(config(synth_data, tmp_path / "a" / store_name, codec=codec))
    other = extract(config(synth_data, tmp_path / "b" / store_name, codec=codec, seed=1))  # another random teacher
    reader, donor = open_store(str(path)), open_store(str(other))
    for source, target in zip(donor.shard_paths(1), reader.shard_paths(1)):
        shutil.copyfile(source, target)
    shutil.copyfile(other / "shards" / "000001.json", path / "shards" / "000001.json")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["shards"][1]["sha256"] = next(r.sha256 for r in donor.manifest.shards if r.index == 1)
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert open_store(str(path)).verify_shards() == [], "the hashes are consistent: only recomputation can tell"
    report = verify(VerifyConfig(store=path, data=synth_data, samples=16))
    assert not report["ok"] and report["shard_problems"] == []
    low = {int(stride) for stride, level in report["levels"].items() if level["min_r"] < level["threshold"]}
    assert low == set(open_store(str(path)).manifest.strides), report["text"]
    assert "r below" in report["text"]


def test_with_images_stores_the_image_bytes_and_the_view_target(synth_data, tmp_path):
    import tarfile

    path = extract(config(synth_data, tmp_path / "wds", with_images=True))
    dataset = CocoDetection(synth_data, "train", make_views(2, 128, 128))
    store = open_store(str(path))
    for index in (0, 3, 9):
        sample = store.read(index)
        item = dataset[divmod(index, 2)]
        assert sample.extras["jpg"] == dataset.image_file(item["image_id"]).read_bytes()
        target = json.loads(sample.extras["target.json"])
        assert target["labels"] == item["target"]["labels"].tolist()
        assert torch.equal(torch.tensor(target["boxes"]).reshape(-1, 4), item["target"]["boxes"])
    with tarfile.open(path / "shard-000000.tar") as tar:  # plain tar members, readable by any tool
        assert {"000000000.jpg", "000000000.target.json", "000000000.meta.json"} <= set(tar.getnames())
    plain = open_store(str(extract(config(synth_data, tmp_path / "plain", views=1))))
    assert plain.read(0).extras == {}


def run_teacher(teacher, batch: list[dict], strides: list[int], device: torch.device, n_views: int, codec: str,
                projected: frozenset[int] = frozenset()):
    """Teacher FPN maps of one same-size batch as Samples encoded with ``codec`` (forward, encode, finish)."""
    maps = teacher_levels(teacher, batch, strides, device, projected)
    return finish(launch_encode(batch, maps, strides, codec), n_views)


class PlantedTeacher:
    """Teacher maps of zeros with one planted value at (image 1, stride 8, one position)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def features(self, images, backbone=None):
        maps = {s: torch.zeros(len(images), 4, 32 // s, 32 // s) for s in (4, 8)}
        maps[8][1, 2, 3, 1] = self.value
        return maps, None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_one_non_finite_value_is_found_and_its_image_named(value):
    batch = [{"image": torch.zeros(3, 32, 32), "image_id": 100 + i, "view_index": 0, "image_index": i,
              "image_hw": (32, 32)} for i in range(3)]
    with pytest.raises(PkdError, match=r"image 101 \(view 0, stride 8\) hold NaN or Inf"):
        run_teacher(PlantedTeacher(value), batch, [4, 8], torch.device("cpu"), 1, "fp16")
    samples = run_teacher(PlantedTeacher(1e4), batch, [4, 8], torch.device("cpu"), 1, "fp16")
    assert float(samples[1].features[8].parts["values"][2, 3, 1]) == 1e4


class SeededTeacher:
    """Seeded random maps (N, 4, 48/s, 48/s) at strides 4 and 8, whatever the images."""

    def features(self, images, backbone=None):
        generator = torch.Generator().manual_seed(len(images))
        return {s: torch.randn(len(images), 4, 48 // s, 48 // s, generator=generator) for s in (4, 8)}, None


def test_projected_levels_of_a_batch_with_mixed_valid_sizes_equal_each_images_own_projection():
    """One padded size, three valid sizes (two images share one): each image's stored projection (at its own
    size) and statistics are the ones ``project_image`` gives for that image alone."""
    sizes = [(48, 48), (40, 28), (48, 48), (33, 47)]
    batch = [{"image": torch.zeros(3, 48, 48), "image_id": i, "view_index": 0, "image_index": i, "image_hw": hw}
             for i, hw in enumerate(sizes)]
    teacher = SeededTeacher()
    samples = run_teacher(teacher, batch, [4, 8], torch.device("cpu"), 1, "fp32", frozenset({4, 8}))
    maps, _ = teacher.features(batch)
    for sample, hw in zip(samples, sizes):
        for s in (4, 8):
            cross, total, square = project_image(maps[s][sample.index], level_size(hw, s))
            np.testing.assert_array_equal(sample.features[s].parts["values"], cross.numpy())  # its own size
            np.testing.assert_allclose(sample.statistics[s]["sum"], total.numpy(), rtol=1e-12)
            np.testing.assert_allclose(sample.statistics[s]["sum_sq"], square.numpy(), rtol=1e-12)


def test_a_value_past_the_codecs_range_is_reported_when_the_batch_is_finished():
    """The fp16 range check is read back with the batch (not where it is launched) and names the batch's images."""
    batch = [{"image": torch.zeros(3, 32, 32), "image_id": 100 + i, "view_index": 0, "image_index": i,
              "image_hw": (32, 32)} for i in range(3)]
    maps = teacher_levels(PlantedTeacher(1e6), batch, [4, 8], torch.device("cpu"))
    launched = launch_encode(batch, maps, [4, 8], "fp16")
    with pytest.raises(PkdError, match=r"images \[100, 101, 102\]: features exceed the fp16 range"):
        finish(launched, 1)


@pytest.mark.parametrize("layout", [{}, {"layout": "projected", "levels": "2,3,4,5", "student_levels": "3,4,5,6"}])
def test_batches_padded_to_the_batch_size_write_the_same_samples_and_values(synth_data, tmp_path, monkeypatch, layout):
    """With CUDA graphs every batch is padded to --batch-size images (one graph per padded size); the padding's
    maps are dropped. Forced here on the CPU: the store holds the same samples with the same values (up to the
    float rounding that a batch's size changes)."""
    settings = dict(codec="fp32", batch_size=3, **layout)
    plain = open_store(str(extract(config(synth_data, tmp_path / "plain.zarr", **settings))))
    sizes = []

    def padded(teacher, batch, *args, **kwargs):
        sizes.append(len(batch))
        return teacher_levels(teacher, batch, *args, **{**kwargs, "pad_to": 3})
    monkeypatch.setattr(stages.extract, "teacher_levels", padded)
    store = open_store(str(extract(config(synth_data, tmp_path / "padded.zarr", **settings))))
    assert min(sizes) < 3 and sum(sizes) == len(store) == len(plain) == 16  # partial batches were padded
    for index in range(len(plain)):
        expected, got = plain.read(index), store.read(index)
        assert (got.index, got.image_id, got.view_index, got.image_hw) == \
            (expected.index, expected.image_id, expected.view_index, expected.image_hw)
        for stride, values in expected.features.items():
            np.testing.assert_allclose(got.features[stride], values, rtol=1e-4, atol=1e-5)  # batch size: float rounding only
        for stride, sums in expected.statistics.items():
            np.testing.assert_allclose(got.statistics[stride]["sum"], sums["sum"], rtol=1e-4, atol=1e-5)  # batch size: float rounding only


@pytest.mark.parametrize("setting,needle", [(dict(codec="fp8"), "unknown codec 'fp8': choose one of fp32"),
                                            (dict(on_error="ignore"), "unknown on-error value 'ignore': choose one of stop, skip"),
                                            (dict(store_format="tar"), "unknown store format 'tar': choose one of zarr, wds"),
                                            (dict(teacher="yolo"), "unknown teacher 'yolo': choose one of retinanet"),
                                            (dict(batch_size=0), "--batch-size must be at least 1, got 0"),
                                            (dict(codec="pca", pca_step=-1.0), "--pca-step must be > 0")])
def test_a_config_is_validated_in_one_place_naming_the_flag(tmp_path, setting, needle):
    with pytest.raises(PkdError, match=needle.replace("(", r"\(")):
        config(tmp_path, tmp_path / "f.zarr", **setting).validate()
    config(tmp_path, tmp_path / "f.zarr").validate()  # the defaults pass
