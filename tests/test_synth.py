"""Tests for stages/synth.py: COCO validity, size spread, clutter cases, determinism, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pkd_offline.errors import PkdError
from stages.synth import CATEGORIES, SynthConfig, synth


def _load(root: Path, split: str) -> COCO:
    return COCO(str(root / "annotations" / f"instances_{split}.json"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default data set (64 train + 16 val at 256 px); its generation time is measured in benchmarks/run.py."""
    out = tmp_path_factory.mktemp("synth") / "data"
    returned = synth(SynthConfig(out=out))
    assert returned == out
    return out


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_counts_and_unique_ids(dataset: Path) -> None:
    root = dataset
    train, val = _load(root, "train"), _load(root, "val")
    assert len(train.getImgIds()) == 64
    assert len(val.getImgIds()) == 16
    assert sorted(train.getImgIds()) == list(range(1, 65))
    assert sorted(val.getImgIds()) == list(range(65, 81))
    ann_ids = train.getAnnIds() + val.getAnnIds()
    assert len(ann_ids) == len(set(ann_ids))


def test_categories_have_gaps(dataset: Path) -> None:
    root = dataset
    for split in ("train", "val"):
        coco = _load(root, split)
        ids = sorted(coco.getCatIds())
        assert ids == [c.id for c in CATEGORIES]
        assert len(ids) == 6
        assert ids != list(range(1, 7))  # a loader must remap ids to contiguous labels
        names = [cat["name"] for cat in coco.loadCats(ids)]
        assert len(set(names)) == 6
        assert all("supercategory" in cat for cat in coco.loadCats(ids))
    # Every class appears in the training split.
    train = _load(root, "train")
    assert {a["category_id"] for a in train.loadAnns(train.getAnnIds())} == set(ids)
    # Class colours are distinct (pairwise RGB distance well above the per-object jitter).
    colours = np.array([c.rgb for c in CATEGORIES], dtype=float)
    distances = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
    assert distances[~np.eye(6, dtype=bool)].min() > 100


def test_images_exist_with_stated_size_and_ragged_heights(dataset: Path) -> None:
    root = dataset
    heights = set()
    for split in ("train", "val"):
        coco = _load(root, split)
        for info in coco.loadImgs(coco.getImgIds()):
            path = root / split / info["file_name"]
            assert path.is_file()
            assert info["file_name"] == f"{info['id']:06d}.jpg"
            with Image.open(path) as image:
                assert image.format == "JPEG"
                assert image.mode == "RGB"
                assert image.size == (info["width"], info["height"])
            assert info["width"] == 256
            heights.add(info["height"])
    assert heights == {256, 192}


def test_boxes_inside_images_and_annotations_well_formed(dataset: Path) -> None:
    root = dataset
    for split in ("train", "val"):
        coco = _load(root, split)
        for ann in coco.loadAnns(coco.getAnnIds()):
            info = coco.imgs[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert all(isinstance(v, float) for v in ann["bbox"])
            assert w > 0 and h > 0
            assert x >= 0 and y >= 0
            assert x + w <= info["width"] and y + h <= info["height"]
            assert ann["iscrowd"] in (0, 1)
            assert isinstance(ann["segmentation"], list) and ann["segmentation"]
            assert all(len(poly) >= 6 and len(poly) % 2 == 0 for poly in ann["segmentation"])
            assert 0 < ann["area"] <= w * h + 1e-6


def test_polygon_masks_match_area_and_box(dataset: Path) -> None:
    root = dataset
    coco = _load(root, "train")
    for ann in coco.loadAnns(coco.getAnnIds())[:60]:
        rle = coco.annToRLE(ann)
        mask_area = float(mask_utils.area(rle))
        # Rasterised polygon area agrees with the stated area up to boundary pixels.
        assert abs(mask_area - ann["area"]) <= 0.25 * ann["area"] + 12
        mask_box = mask_utils.toBbox(rle)
        assert np.allclose(mask_box, ann["bbox"], atol=3.0)  # thin star tips rasterise short


def test_object_sizes_span_pyramid_levels(dataset: Path) -> None:
    root = dataset
    coco = _load(root, "train")
    boxes = np.array([a["bbox"] for a in coco.loadAnns(coco.getAnnIds()) if not a["iscrowd"]])
    long_sides = boxes[:, 2:].max(axis=1)
    assert long_sides.min() < 16
    assert long_sides.max() > 100
    # Log-uniform: a fair share of both small and large objects, not only outliers.
    assert (long_sides < 32).mean() > 0.2
    assert (long_sides > 64).mean() > 0.15


def test_objects_per_image_and_empty_images(dataset: Path) -> None:
    root = dataset
    coco = _load(root, "train")
    per_image = np.array([len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()])
    assert (per_image == 0).sum() >= 1
    assert (per_image == 0).mean() < 0.15
    assert per_image.max() <= 9  # at most 8 objects plus one crowd region
    assert per_image.mean() > 2


def test_some_crowd_annotations(dataset: Path) -> None:
    root = dataset
    coco = _load(root, "train")
    anns = coco.loadAnns(coco.getAnnIds())
    crowd = [a for a in anns if a["iscrowd"] == 1]
    assert 1 <= len(crowd) <= 0.1 * len(anns)
    assert all(len(a["segmentation"]) > 1 for a in crowd)  # several small shapes per region


def test_objects_visible_in_pixels(dataset: Path) -> None:
    """Large objects show their class colour inside their mask; the task is learnable."""
    root = dataset
    coco = _load(root, "train")
    colour_of = {c.id: np.array(c.rgb, dtype=float) for c in CATEGORIES}
    checked = 0
    for ann in coco.loadAnns(coco.getAnnIds()):
        if ann["iscrowd"] or ann["area"] < 400:
            continue
        info = coco.imgs[ann["image_id"]]
        pixels = np.asarray(Image.open(root / "train" / info["file_name"]).convert("RGB"), dtype=float)
        mask = coco.annToMask(ann).astype(bool)
        close = np.linalg.norm(pixels[mask] - colour_of[ann["category_id"]], axis=-1) < 60
        assert close.mean() > 0.25  # at least the unhidden ~30% keeps the class colour
        checked += 1
    assert checked > 20


def test_deterministic_by_seed(tmp_path: Path) -> None:
    first = synth(SynthConfig(out=tmp_path / "a", train=10, val=3, image_size=128, seed=7))
    second = synth(SynthConfig(out=tmp_path / "b", train=10, val=3, image_size=128, seed=7))
    other = synth(SynthConfig(out=tmp_path / "c", train=10, val=3, image_size=128, seed=8))
    first_bytes, second_bytes, other_bytes = _tree_bytes(first), _tree_bytes(second), _tree_bytes(other)
    assert len(first_bytes) == 13 + 2
    assert first_bytes == second_bytes
    assert first_bytes.keys() == other_bytes.keys()
    assert first_bytes["annotations/instances_train.json"] != other_bytes["annotations/instances_train.json"]
    assert first_bytes["train/000001.jpg"] != other_bytes["train/000001.jpg"]


def test_small_image_size_and_no_val(tmp_path: Path) -> None:
    out = synth(SynthConfig(out=tmp_path / "small", train=3, val=0, image_size=64, seed=1))
    train, val = _load(out, "train"), _load(out, "val")
    assert len(train.getImgIds()) == 3 and len(val.getImgIds()) == 0
    for ann in train.loadAnns(train.getAnnIds()):
        x, y, w, h = ann["bbox"]
        assert x + w <= 64 and y + h <= 64


@pytest.mark.parametrize(
    "overrides",
    [{"train": 0}, {"image_size": 63}, {"val": -1}],
)
def test_bad_config_raises_pkd_error(tmp_path: Path, overrides: dict) -> None:
    with pytest.raises(PkdError) as info:
        synth(SynthConfig(out=tmp_path / "data", **overrides))
    assert "\n" not in str(info.value)


def test_output_path_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("not a directory")
    with pytest.raises(PkdError) as info:
        synth(SynthConfig(out=target))
    assert "\n" not in str(info.value)
    assert str(target) in str(info.value)
