"""Two synthetic data sets for a marginal rate: the small one is the large one's first images, exactly.

A marginal rate (the images of a larger run minus those of a smaller one, over the difference of their
seconds) is the per-image cost only if the larger run is the smaller one plus more images. Two
``synth`` calls with different counts draw different images (sizes included: 448x448 and 448x336 in
another mix, a third more teacher work for the wide ones), so the large set is drawn once and the small
one is its first ``small`` images: the same files (linked) and the same annotations.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages.synth import SynthConfig, synth


def nested_data(work: Path, small: int, large: int, image_size: int, seed: int = 0) -> tuple[Path, Path]:
    """(small set, large set) under ``work``, COCO layout (``train`` split of ``small`` and ``large`` images; the
    ``val`` split is the large set's). The images the large set adds: ``added_indices``."""
    large_set = synth(SynthConfig(out=work / f"data-{large}", train=large, val=2, image_size=image_size, seed=seed))
    small_set = work / f"data-{small}-of-{large}"
    (small_set / "annotations").mkdir(parents=True, exist_ok=True)
    coco = json.loads((large_set / "annotations" / "instances_train.json").read_text())
    images = coco["images"][:small]
    kept = {image["id"] for image in images}
    coco.update(images=images, annotations=[a for a in coco["annotations"] if a["image_id"] in kept])
    (small_set / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    for split in ("train", "val"):
        link = small_set / split
        if not link.exists():
            link.symlink_to((large_set / split).resolve(), target_is_directory=True)
    val = large_set / "annotations" / "instances_val.json"
    (small_set / "annotations" / "instances_val.json").write_text(val.read_text())
    return small_set, large_set


def added_indices(dataset, small_set: Path) -> list[int]:
    """Indices into ``dataset`` (a CocoDetection of the large set's train split) of the images the small set
    lacks: the ones the larger run adds, in the dataset's order."""
    coco = json.loads((small_set / "annotations" / "instances_train.json").read_text())
    kept = {image["id"] for image in coco["images"]}
    return [index for index, image_id in enumerate(dataset.image_ids) if image_id not in kept]
