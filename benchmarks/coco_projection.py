"""A store's size projected to COCO train2017 from the bytes per pixel measured on a small set."""

from __future__ import annotations

COCO_TRAIN_IMAGES = 118_287  # every image of instances_train2017.json: extract stores all of them, annotated or not
COCO_PIXELS = 800 * 1067  # the typical COCO image (640x480) resized to short side 800 (1067x800), as the recipe does


def coco_projection(codecs: dict, levels: dict[str, list[int]], channels: int, coco_channels: int = 256) -> dict:
    """Projected store size (GB) for COCO train2017 (118,287 images, each resized to about 1067x800 px:
    ``COCO_PIXELS``) with a 256-channel FPN teacher, per codec, level set and view count, from the bytes
    per valid input pixel per channel measured (``codecs[codec]["bytes_per_pixel_per_level"]``, so padding and
    zstd are as on the measured set)."""
    projection = {}
    for codec in [name for name, row in codecs.items() if isinstance(row, dict) and "bytes_per_pixel_per_level" in row]:
        per_pixel = codecs[codec]["bytes_per_pixel_per_level"]
        for level_name, strides in levels.items():
            bytes_per_image = sum(per_pixel[s] for s in strides) / channels * coco_channels * COCO_PIXELS
            for views in (1, 2):
                projection[f"{codec} {level_name} views={views}"] = bytes_per_image * views * COCO_TRAIN_IMAGES / 1e9
    return projection
