"""Whether a feature store fits a training run: made from this data, for this student, in a layout that
serves this run's level pairing. Each check raises one PkdError line naming what differs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pkd_offline.data import CocoDetection, file_sha256
from pkd_offline.errors import PkdError
from pkd_offline.models import FeatureDetector
from storage import Manifest, open_store
from storage.base import StoreReader

if TYPE_CHECKING:
    from pkd_offline.store_data import StoreImages


def check_store_fits(path: Path | str, dataset: CocoDetection | StoreImages, student: FeatureDetector) -> StoreReader:
    """Open the store and refuse it, naming what differs, unless it was made from this data for this student.

    Checked: annotation file hash, split, image ids (the data's, less the images the store skipped:
    :func:`drop_images_the_store_skipped` drops those from the data set), input normalisation, and
    channel counts. Level pairing is checked by ``pair_levels`` against the manifest's strides. Data read
    from the store itself (:class:`StoreImages`) is checked for normalisation and channels only.
    ``dataset`` is not changed.
    """
    store = open_store(str(path))
    manifest = store.manifest
    problems = _data_problems(manifest, dataset) if isinstance(dataset, CocoDetection) else []
    problems += _student_problems(manifest, student)
    if problems:
        raise PkdError(f"feature store {path} does not fit this run: {'; '.join(problems)}")
    return store


def images_kept(manifest: Manifest, image_ids: list[int]) -> list[int]:
    """``image_ids`` less the images the store skipped (unreadable when it was extracted), in their order."""
    skipped = {entry["image_id"] for entry in manifest.skipped}
    return [i for i in image_ids if i not in skipped]


def drop_images_the_store_skipped(dataset: CocoDetection, manifest: Manifest) -> None:
    """Leave out of ``dataset`` (its ``image_ids``) the images the store skipped: they have no teacher maps.
    After :func:`check_store_fits`, ``dataset.image_ids`` is then the store's ``image_ids``."""
    dataset.image_ids = images_kept(manifest, dataset.image_ids)


def _data_problems(manifest: Manifest, dataset: CocoDetection) -> list[str]:
    """What differs between the store and the data directory."""
    problems = []
    annotation_sha = file_sha256(dataset.annotation_file)
    if manifest.dataset.get("annotation_sha256") != annotation_sha:
        problems.append(f"annotation file {dataset.annotation_file} (sha256 {annotation_sha[:12]}...) is not the one the "
                        f"store was extracted from (sha256 {str(manifest.dataset.get('annotation_sha256'))[:12]}...)")
    if manifest.dataset.get("split") != dataset.split:
        problems.append(f"split {dataset.split!r} vs the store's {manifest.dataset.get('split')!r}")
    wanted = images_kept(manifest, dataset.image_ids)
    if manifest.image_ids != wanted:
        missing = sorted(set(wanted) - set(manifest.image_ids))
        problems.append(f"image ids differ ({len(manifest.image_ids)} in the store, {len(wanted)} in the data; "
                        f"missing e.g. {missing[:5]})")
    return problems


def _student_problems(manifest: Manifest, student: FeatureDetector) -> list[str]:
    """What differs between the store and the student: input normalisation, channel counts."""
    problems = []
    normalization = student.transform.normalization()
    if manifest.normalization != normalization:
        problems.append(f"input normalisation {manifest.normalization} vs the student's {normalization}")
    channels = {level.channels for level in manifest.levels}
    if channels != {student.channels}:
        problems.append(f"teacher maps have {sorted(channels)} channels, the student's FPN {student.channels} "
                        f"(use the teacher's --variant)")
    return problems


def check_layout_fits(manifest: Manifest, pairs: list[tuple[int, int]], level_map: str, size_divisor: int) -> None:
    """Refuse a projected store whose pairing or student strides are not this run's (one PkdError line).

    A projected level holds the teacher map already resized back to one student stride, so it serves
    that (student, teacher) pair only, and only batches padded to a multiple of that stride.
    """
    layout = manifest.layout
    if layout["name"] != "projected":
        return
    stored = {teacher: student for student, teacher in layout["pairs"]}
    wrong = [(s, t) for s, t in pairs if t in manifest.projected_strides and stored[t] != s]
    problems = []
    if level_map != layout["pairing"]:
        problems.append(f"--level-map {level_map} vs the store's pairing {layout['pairing']}")
    if wrong:
        problems.append(f"student strides {[s for s, _ in pairs]} vs the store's {[s for s, _ in layout['pairs']]}")
    odd = [s for s, t in pairs if t in manifest.projected_strides and size_divisor % s]
    if odd:
        problems.append(f"batches padded to multiples of {size_divisor} px (size_divisor), not of student stride "
                        f"{odd[0]}")
    if problems:
        raise PkdError(f"projected feature store does not fit this run: {'; '.join(problems)} (the store holds teacher "
                       f"levels projected for the pairs {layout['pairs']}; re-extract, or train with that pairing)")
