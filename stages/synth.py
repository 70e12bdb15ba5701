"""Synthetic COCO-format detection data set: coloured shapes on cluttered backgrounds.

Layout written by `synth`::

    out/train/{image_id:06d}.jpg
    out/val/{image_id:06d}.jpg
    out/annotations/instances_train.json
    out/annotations/instances_val.json

Six classes, each with its own shape and colour, under COCO-like category ids with gaps
(1, 3, 5, 8, 13, 21) so a loader must map ids to contiguous labels. Object sides are
log-uniform from ~image_size/32 to 0.6 * image_size pixels, so every pyramid level
(strides 4..128) sees objects. The same config gives byte-identical files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pkd_offline.config import setting
from pkd_offline.errors import PkdError

MIN_IMAGE_SIZE = 64
JPEG_QUALITY = 90
MAX_OBJECTS = 8
MIN_VISIBLE_FRACTION = 0.3  # an object more than 70% hidden is not annotated
EMPTY_IMAGE_RATE = 0.05
CROWD_IMAGE_RATE = 0.12  # one crowd region per such image: ~3% of annotations
PLACEMENT_TRIES = 12


@dataclass
class SynthConfig:
    """What `synth` writes; the same config writes byte-identical files."""

    out: Path = setting(help="root folder of the data set (created if missing)")
    train: int = setting(64, help="number of train images")
    val: int = setting(16, help="number of val images")
    image_size: int = setting(256, help="image width in px (the long side); heights are image_size or "
                                        "round(0.75 * image_size)")
    seed: int = setting(0, help="seed of every random choice")
    min_object_side: float | None = setting(None, help="smallest side of a (non-crowd) object's box, px; unset: "
                                                       "max(6, 8 * image_size / 256); larger drops the smallest "
                                                       "objects (an easier set)")

    def validate(self) -> None:
        """PkdError when out is an existing file, train < 1, val < 0, image_size < 64, or min_object_side is
        outside [1, 0.6 * image_size) px."""
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise PkdError(f"synth: output path {out} exists and is not a directory")
        if self.train < 1:
            raise PkdError(f"synth: train must be at least 1 image, got {self.train}")
        if self.val < 0:
            raise PkdError(f"synth: val must be at least 0 images, got {self.val}")
        if self.image_size < MIN_IMAGE_SIZE:
            raise PkdError(f"synth: image_size must be at least {MIN_IMAGE_SIZE} px, got {self.image_size}")
        if self.min_object_side is not None and not 1.0 <= self.min_object_side < 0.6 * self.image_size:
            raise PkdError(f"synth: min_object_side must be in [1, {0.6 * self.image_size:g}) px (0.6 x image_size), "
                           f"got {self.min_object_side}")


# ---- shapes: unit polygons centred on the origin, (N, 2) float arrays ---------------


def _regular(n: int, radius: float, phase: float = 0.0) -> np.ndarray:
    angles = phase + np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _circle() -> np.ndarray:
    return _regular(32, 0.5)


def _square() -> np.ndarray:
    return np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])


def _triangle() -> np.ndarray:
    return _regular(3, 0.5, phase=-math.pi / 2)


def _cross() -> np.ndarray:
    a, b = 0.5, 1.0 / 6.0  # arm half-length, arm half-thickness
    return np.array(
        [[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b],
         [b, a], [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b]]
    )


def _ring() -> np.ndarray:
    # A keyhole polygon: outer circle one way, inner circle back the other way, joined
    # by a zero-width seam, so one COCO polygon (and one PIL fill) gives the annulus.
    outer = _regular(32, 0.5)
    inner = _regular(32, 0.28)[::-1]
    return np.concatenate([outer, outer[:1], inner[-1:], inner], axis=0)


def _star() -> np.ndarray:
    points = _regular(10, 1.0, phase=-math.pi / 2)
    radii = np.where(np.arange(10) % 2 == 0, 0.5, 0.21)
    return points * radii[:, None]


@dataclass(frozen=True)
class Category:
    """One class: COCO id, name, base colour (RGB 0..255), unit polygon, max rotation (deg)."""

    id: int
    name: str
    rgb: tuple[int, int, int]
    shape: Callable[[], np.ndarray]
    max_rotation_deg: float


CATEGORIES: tuple[Category, ...] = (
    Category(1, "circle", (220, 40, 40), _circle, 0.0),
    Category(3, "square", (40, 90, 230), _square, 20.0),
    Category(5, "triangle", (40, 190, 60), _triangle, 20.0),
    Category(8, "cross", (240, 210, 30), _cross, 20.0),
    Category(13, "ring", (210, 50, 210), _ring, 0.0),
    Category(21, "star", (30, 210, 220), _star, 36.0),
)

# Colours of unlabeled clutter: muted, far from every class colour.
CLUTTER_RGB: tuple[tuple[int, int, int], ...] = (
    (120, 80, 50), (90, 90, 90), (235, 235, 225), (30, 30, 35), (130, 130, 70), (160, 120, 110),
)


@dataclass
class _Object:
    """One annotated object: polygons in image pixels, each (N, 2) float (x, y)."""

    category: Category
    polygons: list[np.ndarray]
    rgb: tuple[int, int, int]
    iscrowd: int


def _shape_polygon(category: Category, side: float, rng: np.random.Generator) -> np.ndarray:
    """The category's polygon, rotated, scaled so its box's long side is `side` px, min at 0."""
    polygon = category.shape()
    angle = math.radians(rng.uniform(-1.0, 1.0) * category.max_rotation_deg)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    polygon = polygon @ rotation.T
    polygon = polygon - polygon.min(axis=0)
    return polygon * (side / polygon.max())


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    return tuple(int(c) for c in np.clip(np.array(rgb) + rng.integers(-amount, amount + 1, 3), 0, 255))


def _place(polygon: np.ndarray, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Translate `polygon` (min at 0) to a random spot fully inside the image."""
    extent = polygon.max(axis=0)
    x0 = rng.uniform(0.0, max(width - extent[0] - 1.0, 0.0))
    y0 = rng.uniform(0.0, max(height - extent[1] - 1.0, 0.0))
    return polygon + np.array([x0, y0])


def _single(rng: np.random.Generator, width: int, height: int, min_side: float) -> _Object:
    category = CATEGORIES[rng.integers(len(CATEGORIES))]
    max_side = 0.6 * width
    side = math.exp(rng.uniform(math.log(min_side), math.log(max_side)))
    side = min(side, height - 2.0)
    polygon = _place(_shape_polygon(category, side, rng), width, height, rng)
    return _Object(category, [polygon], _jitter(category.rgb, rng, 15), iscrowd=0)


def _crowd(rng: np.random.Generator, width: int, height: int, scale: float) -> _Object:
    """Several small same-class shapes packed in one region, annotated as one crowd box."""
    category = CATEGORIES[rng.integers(len(CATEGORIES))]
    region = math.exp(rng.uniform(math.log(32.0), math.log(80.0))) * scale
    origin = np.array([rng.uniform(0, width - region - 1), rng.uniform(0, height - region - 1)])
    rgb = _jitter(category.rgb, rng, 15)
    polygons = []
    for _ in range(int(rng.integers(6, 15))):
        polygon = _shape_polygon(category, rng.uniform(5.0, 10.0) * scale, rng)
        offset = rng.uniform(0.0, 1.0, 2) * np.maximum(region - polygon.max(axis=0), 0.0)
        polygons.append(polygon + origin + offset)
    return _Object(category, polygons, rgb, iscrowd=1)


def _mask(obj: _Object, width: int, height: int) -> np.ndarray:
    """(height, width) bool: pixels the object covers."""
    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in obj.polygons:
        draw.polygon([tuple(p) for p in polygon], fill=1)
    return np.asarray(canvas, dtype=bool)


def _layout(
    rng: np.random.Generator, width: int, height: int, n_objects: int, with_crowd: bool, scale: float,
    min_side: float,
) -> list[_Object]:
    """Objects in drawing order (later on top); none ends up more than 70% hidden.

    A candidate that would hide too much of an earlier object, or that overlaps an object
    of its own class (same colour), is moved; after PLACEMENT_TRIES it is left out (never drawn), so every
    visible class-coloured shape has an annotation.
    """
    placed: list[_Object] = []
    full_masks: list[np.ndarray] = []
    visible_masks: list[np.ndarray] = []
    makers = ([lambda: _crowd(rng, width, height, scale)] if with_crowd else []) + [
        lambda: _single(rng, width, height, min_side=min_side)
    ] * n_objects
    for make in makers:
        for _ in range(PLACEMENT_TRIES):
            candidate = make()
            mask = _mask(candidate, width, height)
            if not mask.any():
                continue
            # Same-class shapes share a colour, so touching ones would merge into one blob.
            if any(p.category is candidate.category and (f & mask).any() for p, f in zip(placed, full_masks)):
                continue
            after = [visible & ~mask for visible in visible_masks]
            if all(v.sum() >= MIN_VISIBLE_FRACTION * f.sum() for v, f in zip(after, full_masks)):
                placed.append(candidate)
                full_masks.append(mask)
                visible_masks = after + [mask]
                break
    return placed


def _background(rng: np.random.Generator, width: int, height: int, scale: float) -> Image.Image:
    """Muted low-frequency texture plus pixel noise, random lines and unlabeled blobs."""
    coarse = rng.uniform(70, 180, (6, 8, 1)) + rng.uniform(-20, 20, (6, 8, 3))
    base = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    noisy = np.asarray(base, dtype=np.float32) + rng.normal(0.0, 8.0, (height, width, 3))
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 6))):
        ends = rng.uniform(0, 1, 4) * np.array([width, height, width, height])
        colour = CLUTTER_RGB[rng.integers(len(CLUTTER_RGB))]
        draw.line([tuple(ends[:2]), tuple(ends[2:])], fill=colour, width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(0, 6))):
        w, h = rng.uniform(4, 20, 2) * scale
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        colour = _jitter(CLUTTER_RGB[rng.integers(len(CLUTTER_RGB))], rng, 10)
        draw.ellipse([x, y, x + w, y + h], fill=colour)
    return image.filter(ImageFilter.GaussianBlur(0.6))


def _render(background: Image.Image, objects: list[_Object]) -> Image.Image:
    image = background.copy()
    draw = ImageDraw.Draw(image)
    for obj in objects:
        for polygon in obj.polygons:
            draw.polygon([tuple(p) for p in polygon], fill=obj.rgb)
    return image


def _polygon_area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _annotation(obj: _Object, annotation_id: int, image_id: int) -> dict:
    """COCO annotation: bbox [x, y, w, h] in pixels (float), area in pixels², polygons."""
    points = np.concatenate(obj.polygons, axis=0)
    x0, y0 = points.min(axis=0)
    x1, y1 = points.max(axis=0)
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": obj.category.id,
        "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
        "area": round(sum(_polygon_area(p) for p in obj.polygons), 2),
        "iscrowd": obj.iscrowd,
        "segmentation": [[round(float(v), 2) for v in p.reshape(-1)] for p in obj.polygons],
    }


def _pick(rng: np.random.Generator, n: int, count: int, exclude: set[int]) -> set[int]:
    candidates = [i for i in range(n) if i not in exclude]
    count = min(count, len(candidates))
    return {candidates[i] for i in rng.choice(len(candidates), size=count, replace=False)}


def _write_split(
    rng: np.random.Generator, out: Path, split: str, n_images: int, first_image_id: int, image_size: int,
    min_object_side: float | None = None,
) -> None:
    """Write n_images JPEGs to out/split/ and their COCO JSON to out/annotations/."""
    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    scale = image_size / 256.0
    min_side = max(6.0, 8.0 * scale) if min_object_side is None else float(min_object_side)
    # Fixed counts rather than per-image coin flips, so every split of 8+ images has some.
    big_enough = n_images >= 8
    empty = _pick(rng, n_images, max(1, round(EMPTY_IMAGE_RATE * n_images)) if big_enough else 0, set())
    crowded = _pick(rng, n_images, max(1, round(CROWD_IMAGE_RATE * n_images)) if big_enough else 0, empty)
    images, annotations = [], []
    for index in range(n_images):
        image_id = first_image_id + index
        width = image_size
        height = image_size if rng.random() < 0.5 else round(0.75 * image_size)
        n_objects = 0 if index in empty else int(rng.integers(1, MAX_OBJECTS + 1))
        objects = _layout(rng, width, height, n_objects, index in crowded, scale, min_side)
        image = _render(_background(rng, width, height, scale), objects)
        file_name = f"{image_id:06d}.jpg"
        image.save(image_dir / file_name, format="JPEG", quality=JPEG_QUALITY)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        # Ids unique across both splits without knowing the other split's count.
        for k, obj in enumerate(objects):
            annotations.append(_annotation(obj, image_id * 100 + k + 1, image_id))
    coco = {
        "info": {"description": "pkd-offline synthetic shapes", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c.id, "name": c.name, "supercategory": "shape"} for c in CATEGORIES],
    }
    annotation_dir = out / "annotations"
    annotation_dir.mkdir(parents=True, exist_ok=True)
    (annotation_dir / f"instances_{split}.json").write_text(json.dumps(coco))


def synth(cfg: SynthConfig) -> Path:
    """Write the synthetic data set described in the module docstring; return cfg.out.

    Image ids run 1..train for train and train+1..train+val for val. Raises PkdError for values
    :meth:`SynthConfig.validate` refuses.
    """
    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # One generator per split, so the val images do not depend on how many train images exist.
    train_rng, val_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(2))
    _write_split(train_rng, out, "train", cfg.train, 1, cfg.image_size, cfg.min_object_side)
    _write_split(val_rng, out, "val", cfg.val, cfg.train + 1, cfg.image_size, cfg.min_object_side)
    return out
