"""The projected store layout: the loss from stored statistics equals the map-based PKD loss.

Maths on ragged batches of real-size images for every pair of the index pairing P2..P5 -> P3..P6,
then through the real data path: ``extract --layout projected`` stores read by training's loaders.
"""

import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pkd_offline.data import CocoDetection, collate
from pkd_offline.engine import Distillation, batch_padded_hw, distillation_loss
from pkd_offline.loss import EPS, pcc_loss
from pkd_offline.projection import project_image, projection_is_exact
from pkd_offline.pyramid import level_size, pad_teacher_maps, projected_statistics, valid_masks
from stages.extract import ExtractConfig, extract
from stages.inspect import inspect_store
from pkd_offline.store_data import StoreJoinedDataset, StoreStream, store_views
from stages.verify import VerifyConfig, verify
from storage import Manifest, StoreError, describe, open_store
from storage.testing import killed_copy

INDEX_PAIRS = [(8, 4), (16, 8), (32, 16), (64, 32)]
# Ragged batches, px: the first image fills its frame (the fold), 288 px is an odd number of P5 cells
# (the P5 -> P6 fallback), the last batch is COCO-sized.
BATCHES = [[(320, 448), (283, 401), (250, 330)], [(283, 401), (199, 301)], [(800, 1216), (640, 1000)]]


def reference_loss(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The map-based PKD loss in float64, written out: resize the student, standardise both over the valid
    region (population variance, EPS on the std), mse / 2."""
    teacher, student = teacher.double(), student.double()
    student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
    weight = valid.double().unsqueeze(1)
    count = weight.sum()

    def standardise(x):
        mean = (x * weight).sum((0, 2, 3), keepdim=True) / count
        var = ((x - mean).square() * weight).sum((0, 2, 3), keepdim=True) / count
        return (x - mean) / (torch.sqrt(var + 1e-12) + EPS)

    return ((standardise(student) - standardise(teacher)).square() * weight).sum() / (count * teacher.shape[1]) / 2


def padded(hw: tuple[int, int], divisor: int = 32) -> tuple[int, int]:
    return tuple(math.ceil(v / divisor) * divisor for v in hw)


def batch_case(images, student_stride, teacher_stride, seed, channels=3):
    """Per-image teacher maps at each image's own padded size (noise past the valid region too) and a
    student map correlated with them, at the batch frame."""
    generator = torch.Generator().manual_seed(seed)
    frame = (max(padded(hw)[0] for hw in images), max(padded(hw)[1] for hw in images))
    own = [torch.randn(channels, *level_size(padded(hw), teacher_stride), generator=generator) + 0.5 for hw in images]
    maps = pad_teacher_maps([{teacher_stride: m} for m in own], frame)[teacher_stride]
    valid = valid_masks(images, frame, [teacher_stride])[teacher_stride]
    student_hw = level_size(frame, student_stride)
    pooled = F.adaptive_avg_pool2d(maps, student_hw)
    student = (pooled + 0.5 * torch.randn(pooled.shape, generator=generator)).requires_grad_()
    return own, maps, valid, frame, student


def loss_and_grad(student, teacher, valid=None):
    student.grad = None
    loss = pcc_loss(student, teacher, valid) if valid is not None else pcc_loss(student, teacher)
    loss.backward()
    return loss.item(), student.grad.clone()


@pytest.mark.parametrize("pair", INDEX_PAIRS, ids=lambda p: f"S{p[0]}-T{p[1]}")
@pytest.mark.parametrize("images", BATCHES, ids=["fills-frame", "odd-p5", "coco-size"])
def test_loss_and_gradient_match_the_map_loss_on_ragged_batches(images, pair):
    student_stride, teacher_stride = pair
    own, maps, valid, frame, student = batch_case(images, student_stride, teacher_stride, seed=sum(pair))
    student.grad = None
    reference = reference_loss(student, maps, valid)
    reference.backward()
    expected_grad = student.grad.clone()
    scale = expected_grad.abs().max()
    assert 0.1 < reference.item() < 0.99  # correlated, so the cross term matters
    from_maps, grad = loss_and_grad(student, maps, valid)
    assert from_maps == pytest.approx(reference.item(), abs=1e-6)
    assert (grad - expected_grad).abs().max() <= 2e-6 * scale
    exact = projection_is_exact(student_stride, teacher_stride, 32)
    odd_frame = any(level_size(frame, teacher_stride)[axis] % 2 for axis in (0, 1))
    assert exact or teacher_stride == 32, "only the P5 -> P6 pair may fall back to full maps"
    if not exact:
        assert odd_frame or images is not BATCHES[1], "the odd-P5 batch must exercise the fallback's frame"
        return
    stored = [project_image(m, level_size(hw, teacher_stride)) for m, hw in zip(own, images)]
    statistics = projected_statistics(stored, images, frame, teacher_stride, tuple(student.shape[-2:]))
    from_store, grad = loss_and_grad(student, statistics)
    assert from_store == pytest.approx(reference.item(), abs=1e-6)
    assert (grad - expected_grad).abs().max() <= 2e-6 * scale


def test_an_odd_teacher_frame_is_not_projected_and_is_refused_if_forced():
    assert [projection_is_exact(s, t, 32) for s, t in INDEX_PAIRS] == [True, True, True, False]
    assert projection_is_exact(64, 32, 64) and not projection_is_exact(16, 16, 32)
    own, _, _, frame, student = batch_case(BATCHES[1], 64, 32, seed=5)
    stored = [project_image(m, level_size(hw, 32)) for m, hw in zip(own, BATCHES[1])]
    with pytest.raises(Exception, match="half the teacher"):
        projected_statistics(stored, BATCHES[1], frame, 32, tuple(student.shape[-2:]))


def test_padding_and_values_past_the_image_do_not_change_the_projected_loss():
    images = BATCHES[0]
    own, maps, valid, frame, student = batch_case(images, 8, 4, seed=7)
    stored = [project_image(m, level_size(hw, 4)) for m, hw in zip(own, images)]
    garbage = []
    for m, hw in zip(own, images):
        noisy = m.clone()
        h, w = level_size(hw, 4)
        noisy[:, h:] = 1e3
        noisy[:, :, w:] = -1e3
        garbage.append(project_image(noisy, (h, w)))
    for (a, b, c), (x, y, z) in zip(stored, garbage):
        assert torch.equal(a, x) and torch.equal(b, y) and torch.equal(c, z)
    # A bigger batch frame (another image padded the batch further): the same images, the same loss,
    # with the student's map extended by the values its wider frame would hold past every image.
    wide = (frame[0] + 64, frame[1] + 64)
    student_hw = level_size(wide, 8)
    statistics = projected_statistics(stored, images, frame, 4, tuple(student.shape[-2:]))
    small = pcc_loss(student, statistics).item()
    wide_student = F.pad(student.detach(), (0, student_hw[1] - student.shape[-1], 0, student_hw[0] - student.shape[-2]),
                         mode="replicate")  # replicate = what the clamp at the small frame's border saw
    wide_statistics = projected_statistics(stored, images, wide, 4, student_hw)
    assert pcc_loss(wide_student, wide_statistics).item() == pytest.approx(small, abs=1e-6)
    wide_maps = F.pad(maps, (0, 2 * student_hw[1] - maps.shape[-1], 0, 2 * student_hw[0] - maps.shape[-2]), value=7.0)
    wide_valid = valid_masks(images, wide, [4])[4]
    assert pcc_loss(wide_student, wide_maps, wide_valid).item() == pytest.approx(small, abs=1e-6)


def test_the_fold_is_needed_where_an_image_fills_the_frame():
    """Leaving the extra row and column unfolded would change the loss: the test above bites on it."""
    images = [(320, 448)]
    own, maps, valid, frame, student = batch_case(images, 8, 4, seed=11)
    cross, total, square = project_image(own[0], level_size(images[0], 4))
    assert cross.shape[-2:] == (41, 57) and cross[:, -1].abs().sum() > 0
    statistics = projected_statistics([(cross, total, square)], images, frame, 4, tuple(student.shape[-2:]))
    unfolded = statistics.cross.clone()
    unfolded[0, :, :40, :56] = cross[:, :40, :56]
    assert not torch.allclose(unfolded, statistics.cross)
    assert pcc_loss(student, statistics).item() == pytest.approx(reference_loss(student, maps, valid).item(), abs=1e-6)


def extract_config(data, out, **overrides) -> ExtractConfig:
    settings = dict(teacher="swin", random_init=True, variant="tiny", data=data, split="train", out=out, views=1,
                    short_side=128, max_size=128, batch_size=4, workers=0, samples_per_shard=4, progress=False,
                    levels="2,3,4,5")
    return ExtractConfig(**{**settings, **overrides})


def projected(data, out, **overrides) -> ExtractConfig:
    return extract_config(data, out, layout="projected", student_levels="3,4,5,6", **overrides)


@pytest.fixture(scope="module")
def full_store(synth_data, tmp_path_factory):
    return extract(extract_config(synth_data, tmp_path_factory.mktemp("full") / "full.zarr", codec="fp32"))


def store_batch(synth_data, store, keys):
    """Training's loader's batch of ``keys`` (image index, view) from ``store`` (zarr: map-style; wds: the stream)."""
    dataset = CocoDetection(synth_data, "train", store_views(store))
    if open_store(str(store)).manifest.format == "wds":
        items = {(item["image_id"], item["view_index"]): item for item in StoreStream(dataset, store, shuffle_buffer=1)}
        return collate([items[(dataset.image_ids[i], v)] for i, v in keys])
    joined = StoreJoinedDataset(dataset, store)
    return collate([joined[key] for key in keys])


def student_like(batch):
    """Student maps {student stride: (N, C, h, w)} correlated with the batch's (full) teacher maps, seeded."""
    generator = torch.Generator().manual_seed(0)
    frame = batch_padded_hw(batch, 32)
    features = {}
    for s, t in INDEX_PAIRS:
        maps = pad_teacher_maps([{t: item["teacher_features"][t]} for item in batch], frame)[t]
        pooled = F.adaptive_avg_pool2d(maps, level_size(frame, s))
        features[s] = pooled + pooled.std() * torch.randn(pooled.shape, generator=generator)
    return features


def batch_loss(batch, student_features):
    images = [item["image"] for item in batch]
    return distillation_loss(student_features, batch, images, Distillation(INDEX_PAIRS, 1.0), 32, torch.device("cpu"))


# Loss error against the fp32 full-map store on this batch (4 levels, alpha 1, loss about 2.0), as
# measured: full-map fp16 -3.6e-6, int8 +1.7e-6; projected fp32 0, fp16 -1.1e-5, int8 -1.1e-5 (the
# projection's cross map is rounded by the codec, its sums are float64 from the exact map).
TOLERANCE = {"fp32": 1e-6, "fp16": 5e-5, "int8": 5e-5}


@pytest.mark.parametrize("store_name,codec", [("p.zarr", "fp32"), ("p.zarr", "int8"), ("pw", "fp16"), ("pw", "int8")])
def test_projected_store_gives_the_full_store_loss_through_training_loaders(synth_data, tmp_path, full_store,
                                                                             store_name, codec):
    store = extract(projected(synth_data, tmp_path / store_name, codec=codec))
    manifest = open_store(str(store)).manifest
    assert manifest.layout["projected"] == [4, 8, 16] and manifest.layout["pairs"] == [list(p) for p in INDEX_PAIRS]
    keys = [(0, 0), (1, 0), (5, 0), (6, 0)]
    reference_batch = store_batch(synth_data, full_store, keys)
    student = student_like(reference_batch)
    expected = batch_loss(reference_batch, student)
    batch = store_batch(synth_data, store, keys)
    loss = batch_loss(batch, student)
    assert {item["image_hw"][0] for item in batch} == {96, 128}, "a ragged batch"
    assert set(batch[0]["teacher_sums"]) == {4, 8, 16} and 32 not in batch[0]["teacher_sums"]
    assert batch[0]["teacher_features"][4].shape[-2:] == (17, 17)  # 128 px: 32 P2 cells -> 16 + 1 P3 cells
    assert 0.5 < expected.item() < 3.0  # 4 levels, each well below 1 - 0: the cross term matters
    assert loss.item() == pytest.approx(expected.item(), abs=TOLERANCE[codec])


@pytest.mark.parametrize("store_name", ["p.zarr", "pw"])
def test_projected_store_is_four_times_smaller_inspected_verified_and_resumable(synth_data, tmp_path, full_store,
                                                                                store_name):
    store = extract(projected(synth_data, tmp_path / store_name, codec="fp32"))
    summary, full = describe(open_store(str(store))), describe(open_store(str(full_store)))
    assert [summary["levels"][s]["stored"] for s in (4, 8, 16, 32)] == ["projection"] * 3 + ["map"]
    for stride in (4, 8):
        assert summary["levels"][stride]["bytes_per_image"] < full["levels"][stride]["bytes_per_image"] / 2.5
        assert summary["levels"][stride]["fp32_bytes_per_image"] == full["levels"][stride]["fp32_bytes_per_image"]
    text = inspect_store(str(store))
    assert "projected for index pairs P2->P3, P3->P4, P4->P5, P5->P6 (map)" in text and "projection" in text
    report = verify(VerifyConfig(store=store, data=synth_data, samples=3))
    assert report["ok"], report["text"]
    # A kill: shards 1 and 2 unfinished; resuming gives the same content.
    killed = killed_copy(store, tmp_path / "killed" / store_name, unfinished_shards=(1, 0))
    extract(projected(synth_data, killed, codec="fp32"))
    assert describe(open_store(str(killed)))["digest"] == summary["digest"]


def test_layout_is_part_of_the_job_and_old_manifests_read_as_full(synth_data, tmp_path, full_store):
    out = tmp_path / "p.zarr"
    extract(projected(synth_data, out))
    with pytest.raises(StoreError, match="layout"):
        extract(extract_config(synth_data, out))
    raw = json.loads((full_store / "manifest.json").read_text())
    assert raw.pop("layout") == {"name": "full"}
    assert Manifest.from_json(json.dumps(raw)).layout == {"name": "full"}
    bad = json.loads((out / "manifest.json").read_text())
    bad["layout"]["projected"] = [32]
    with pytest.raises(StoreError, match="only exact 2x pairs"):
        Manifest.from_json(json.dumps(bad))


def test_projected_store_sums_are_checked_on_read(synth_data, tmp_path):
    store = extract(projected(synth_data, tmp_path / "pw", codec="fp16"))
    reader = open_store(str(store))
    sample = reader.read(0)
    assert sample.statistics[4]["sum"].dtype == np.float64 and sample.statistics[4]["sum"].shape == (64,)
    writer_manifest = reader.manifest
    from storage.wds_store import WdsWriter

    writer = WdsWriter(reader.location, writer_manifest)
    broken = sample
    broken.statistics[4]["sum"] = np.full(64, np.nan)
    with pytest.raises(StoreError, match="finite"):
        writer._validate(0, [broken] + [reader.read(i) for i in range(1, 4)])


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pkd_offline", *args], capture_output=True, text=True, timeout=300)


def test_training_refuses_a_projected_store_of_another_pairing(synth_data, tmp_path):
    store = extract(projected(synth_data, tmp_path / "p.zarr"))
    common = ["train", "--backbone", "resnet18", "--variant", "tiny", "--data",
              str(synth_data), "--features", str(store), "--iters", "1", "--batch-size", "2", "--workers", "0",
              "--short-side", "128", "--max-size", "128", "--no-progress", "--out", str(tmp_path / "run")]
    for extra, needle in ((["--student", "retinanet", "--level-map", "stride"],
                           "--level-map stride vs the store's pairing index"),
                          (["--student", "fasterrcnn", "--level-map", "index"],
                           "student strides [4, 8, 16, 32] vs the store's [8, 16, 32, 64]")):
        result = run_cli(*common, *extra)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr and needle in lines[0], result.stderr


def projected_manifest(fmt: str, codec: str):
    """A tiny projected manifest (teacher strides 4, 8 for student strides 8, 16) and its samples with sums."""
    import dataclasses

    from storage.testing import tiny_manifest, tiny_samples

    base = tiny_manifest(fmt=fmt, codec=codec, strides=(4, 8), max_image_hw=(64, 80))
    samples = tiny_samples(base)
    levels = [dataclasses.replace(level, max_height=64 // (2 * level.stride) + 1, max_width=80 // (2 * level.stride) + 1)
              for level in base.levels]
    manifest = dataclasses.replace(base, levels=levels, layout={
        "name": "projected", "pairing": "index", "pairs": [[8, 4], [16, 8]], "projected": [4, 8],
        "resize": "bilinear, align_corners=False", "size_divisor": 32})
    for sample in samples:
        for stride, values in list(sample.features.items()):
            cross, total, square = project_image(torch.from_numpy(values), level_size(sample.image_hw, stride))
            sample.features[stride] = cross.numpy()
            sample.statistics[stride] = {"sum": total.numpy(), "sum_sq": square.numpy()}
    return manifest, samples


S3_AVAILABLE = all(importlib.util.find_spec(name) for name in ("s3fs", "moto"))
if S3_AVAILABLE:
    from test_remote_store import BUCKET, s3  # noqa: F401 - the loopback S3 server fixture


@pytest.mark.skipif(not S3_AVAILABLE, reason="needs s3fs and moto")
@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_projected_store_round_trips_on_s3(s3, tmp_path, fmt):  # noqa: F811
    from storage.testing import write_store

    manifest, samples = projected_manifest(fmt, "int8")
    url = f"s3://{BUCKET}/projected-{fmt}/" + ("f.zarr" if fmt == "zarr" else "shards/")
    write_store(url, manifest, samples)
    write_store(str(tmp_path / fmt), manifest, samples)
    remote = open_store(url)
    assert remote.manifest.layout == manifest.layout
    assert describe(remote)["digest"] == describe(open_store(str(tmp_path / fmt)))["digest"]
    for index in (0, 5):
        stored = remote.read(index)
        for stride in (4, 8):
            np.testing.assert_array_equal(stored.statistics[stride]["sum_sq"], samples[index].statistics[stride]["sum_sq"])
            assert stored.features[stride].shape == samples[index].features[stride].shape
    assert remote.verify_shards() == []


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_damaged_projected_sums_are_read_errors(tmp_path, fmt):
    """Seeded byte flips in the files holding the sums: every read is a StoreError or the exact values."""
    from storage.testing import write_store

    manifest, samples = projected_manifest(fmt, "fp16")
    root = tmp_path / fmt
    write_store(str(root), manifest, samples)
    files = sorted(p for p in root.rglob("*") if p.is_file() and ("sum" in str(p.relative_to(root)) or p.suffix == ".tar"))
    assert files
    rng = np.random.default_rng(0)
    outcomes = set()
    for trial in range(12):
        victim = files[trial % len(files)]
        original = victim.read_bytes()
        damaged = bytearray(original)
        damaged[int(rng.integers(len(damaged)))] ^= 1 << int(rng.integers(8))
        victim.write_bytes(bytes(damaged))
        try:
            reader = open_store(str(root))
            for sample in reader.iter_samples():
                for stride in (4, 8):
                    np.testing.assert_array_equal(sample.statistics[stride]["sum"],
                                                  samples[sample.index].statistics[stride]["sum"])
            outcomes.add("intact")
        except StoreError:
            outcomes.add("error")
        finally:
            victim.write_bytes(original)
    assert "error" in outcomes


@pytest.mark.parametrize("store_name,codec", [("p.zarr", "int8"), ("pw", "int8"), ("p.zarr", "pca")])
def test_training_runs_on_a_projected_store(synth_data, tmp_path, store_name, codec):
    from stages.train import TrainConfig, train

    store = extract(projected(synth_data, tmp_path / store_name, codec=codec))
    out = tmp_path / "run"
    train(TrainConfig(student="retinanet", backbone="resnet18", variant="tiny", data=synth_data, out=out,
                      features=store, level_map="index", iters=2, batch_size=4, workers=0, short_side=128,
                      max_size=128, val_split=None, warmup_iters=1, optimizer="adamw", lr=1e-3, progress=False))
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # 4 levels of 1 - r for an untrained student: each near 1.
    assert len(steps) == 2 and all(2.0 < step["loss_pkd"] / 6.0 < 8.0 for step in steps), [s["loss_pkd"] for s in steps]


def test_a_projected_store_needs_batches_padded_to_its_student_strides(synth_data, tmp_path):
    from pkd_offline.errors import PkdError
    from pkd_offline.store_fit import check_layout_fits

    manifest = open_store(str(extract(projected(synth_data, tmp_path / "p.zarr")))).manifest
    check_layout_fits(manifest, INDEX_PAIRS, "index", 64)
    check_layout_fits(manifest, INDEX_PAIRS[:2], "index", 32)  # fewer pairs of the same pairing fit
    with pytest.raises(PkdError, match="multiples of 16 px .* student stride 32"):
        check_layout_fits(manifest, INDEX_PAIRS, "index", 16)
