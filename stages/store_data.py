"""Joining training data with a feature store, and the checks that the store fits the run."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from pkd_offline.data import CocoDetection, ViewSampler, file_sha256
from pkd_offline.errors import PkdError
from pkd_offline.models import FeatureDetector
from pkd_offline.views import View
from storage import Sample, StoreError, open_store
from storage.base import StoreReader


def store_views(path: Path | str) -> list[View]:
    """The views a store was extracted with: training replays exactly these."""
    return [View.from_dict(view) for view in open_store(str(path)).manifest.views]


def check_store_fits(path: Path | str, dataset: CocoDetection, student: FeatureDetector) -> StoreReader:
    """Open the store and refuse it, naming what differs, unless it was made from this data for this student.

    Checked: annotation file hash, split, image ids (less the images the store skipped, which are
    dropped from ``dataset``), input normalisation, and channel counts. Level pairing is checked by
    ``pair_levels`` against the manifest's strides.
    """
    store = open_store(str(path))
    manifest = store.manifest
    problems = []
    annotation_sha = file_sha256(dataset.annotation_file)
    if manifest.dataset.get("annotation_sha256") != annotation_sha:
        problems.append(f"annotation file {dataset.annotation_file} (sha256 {annotation_sha[:12]}...) is not the one the "
                        f"store was extracted from (sha256 {str(manifest.dataset.get('annotation_sha256'))[:12]}...)")
    if manifest.dataset.get("split") != dataset.split:
        problems.append(f"split {dataset.split!r} vs the store's {manifest.dataset.get('split')!r}")
    skipped = {entry["image_id"] for entry in manifest.skipped}
    wanted = [i for i in dataset.image_ids if i not in skipped]
    if manifest.image_ids != wanted:
        missing = sorted(set(wanted) - set(manifest.image_ids))
        problems.append(f"image ids differ ({len(manifest.image_ids)} in the store, {len(wanted)} in the data; "
                        f"missing e.g. {missing[:5]})")
    normalization = student.transform.normalization()
    if manifest.normalization != normalization:
        problems.append(f"input normalisation {manifest.normalization} vs the student's {normalization}")
    channels = {level.channels for level in manifest.levels}
    if channels != {student.channels}:
        problems.append(f"teacher maps have {sorted(channels)} channels, the student's FPN {student.channels} "
                        f"(use the teacher's --variant)")
    if problems:
        raise PkdError(f"feature store {path} does not fit this run: {'; '.join(problems)}")
    dataset.image_ids = wanted
    return store


def join_features(item: dict, sample: Sample) -> dict:
    """Add the stored ``teacher_features`` {stride: float32 (C, h, w)} to a data item of the same image and view.

    The replayed view must give the image size the store recorded, or the join is refused (the
    data changed under the store).
    """
    if tuple(sample.image_hw) != tuple(item["image_hw"]):
        raise PkdError(f"image {item['image_id']} view {item['view_index']} replays to {tuple(item['image_hw'])} px "
                       f"but the store recorded {tuple(sample.image_hw)}: re-extract the store")
    item["teacher_features"] = {s: torch.from_numpy(values) for s, values in sample.features.items()}
    if sample.statistics:  # a projected store: the levels' cross maps come with their float64 sums
        item["teacher_sums"] = {s: (torch.from_numpy(sums["sum"]), torch.from_numpy(sums["sum_sq"]))
                                for s, sums in sample.statistics.items()}
    return item


def check_layout_fits(manifest, pairs: list[tuple[int, int]], level_map: str, size_divisor: int) -> None:
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


class StoreJoinedDataset(Dataset):
    """``dataset[(image_index, view_index)]`` plus ``teacher_features`` {stride: float32 (C, h, w)} from the store.

    The store is opened lazily in each DataLoader worker (random access: the zarr way). With
    ``skip_damaged`` a sample the store cannot read comes back as ``{"skipped": reason, ...}``.
    """

    def __init__(self, dataset: CocoDetection, store_path: Path | str, *, skip_damaged: bool = False) -> None:
        self.dataset = dataset
        self.store_path = store_path  # a local path or a URL (s3://...): Path() would mangle a URL
        self.skip_damaged = skip_damaged
        self._store: StoreReader | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        if self._store is None:
            self._store = open_store(str(self.store_path))
        item = self.dataset[key]
        try:
            sample = self._store.read(self._store.index_of(item["image_id"], item["view_index"]))
        except StoreError as error:
            if not self.skip_damaged:
                raise
            return {"skipped": str(error), "image_id": item["image_id"], "view_index": item["view_index"]}
        return join_features(item, sample)


class StoreStream(IterableDataset):
    """Streams a store shard by shard (the WebDataset way): each DataLoader worker, and each rank,
    reads a disjoint set of shards sequentially and keeps, per image, only the view chosen for the
    epoch (the same choice :class:`ViewSampler` makes), joined with its image and target.

    A shuffle buffer of ``shuffle_buffer`` samples mixes the order (seeded by seed, epoch, worker).
    One epoch yields every image once. ``set_epoch`` works as on a sampler.
    """

    def __init__(self, dataset: CocoDetection, store_path: Path | str, *, seed: int = 0, shuffle_buffer: int = 256,
                 rank: int = 0, num_replicas: int = 1, skip_damaged: bool = False) -> None:
        self.dataset, self.store_path = dataset, store_path
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.rank, self.num_replicas = rank, num_replicas
        self.skip_damaged = skip_damaged
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))

    def _my_shards(self, n_shards: int) -> list[int]:
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        slot, slots = self.rank * workers + worker, self.num_replicas * workers
        return list(range(slot, n_shards, slots))

    def __iter__(self):
        store = open_store(str(self.store_path))
        sampler = ViewSampler(len(self.dataset), store.manifest.n_views, seed=self.seed)
        sampler.set_epoch(self.epoch)
        chosen = dict(sampler.keys())
        image_index = {image_id: i for i, image_id in enumerate(self.dataset.image_ids)}
        info = get_worker_info()
        generator = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{0 if info is None else info.id}")
        buffer: list[dict] = []
        for sample in self._samples(store):
            if isinstance(sample, dict):  # a damaged-shard marker
                yield sample
                continue
            index = image_index.get(sample.image_id)
            if index is None or chosen[index] != sample.view_index:
                continue
            buffer.append(join_features(self.dataset[(index, sample.view_index)], sample))
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(generator.randrange(len(buffer)))
        generator.shuffle(buffer)
        yield from buffer

    def _samples(self, store: StoreReader):
        """This worker's samples shard by shard; with ``skip_damaged`` the unreadable rest of a shard
        becomes one ``{"skipped": reason}`` marker instead of an error."""
        for k in self._my_shards(store.manifest.n_shards):
            try:
                yield from store.iter_samples([k])
            except StoreError as error:
                if not self.skip_damaged:
                    raise
                yield {"skipped": f"shard {k}: {error}", "image_id": None, "view_index": None}
