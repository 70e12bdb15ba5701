"""Datasets over a feature store: the store's own images (:class:`StoreImages`), and training data joined
with its stored teacher maps, by random access (:class:`StoreJoinedDataset`) or shard by shard
(:class:`StoreStream`). Whether a store fits a run is :mod:`pkd_offline.store_fit`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from pkd_offline.data import CocoDetection, ViewSampler, decode_image
from pkd_offline.device_codecs import EncodedMap
from pkd_offline.errors import PkdError
from pkd_offline.models import USES_MASKS
from pkd_offline.views import View, apply_view
from storage import Sample, StoreError, open_store
from storage.base import StoreReader
from storage.codecs import EncodedLevel


def store_views(path: Path | str) -> list[View]:
    """The views a store was extracted with: training replays exactly these."""
    return [View.from_dict(view) for view in open_store(str(path)).manifest.views]


class StoreImages:
    """The training data of a store written with ``extract --with-images``, without the data directory.

    It stands where :class:`CocoDetection` stands for :class:`StoreStream`: ``split``, ``image_ids``
    (store order), ``category_ids`` (contiguous label ``i + 1`` is ``category_ids[i]``), ``num_classes``
    (with background), ``views``; :meth:`item` makes a sample's data item (the stored image file
    decoded and replayed through its view; the stored target, already in the view's pixels).
    """

    with_masks = False

    def __init__(self, store_path: Path | str, manifest, views: list[View]) -> None:
        self.store_path, self.views = store_path, list(views)
        self.split = manifest.dataset.get("split")
        self.image_ids: list[int] = list(manifest.image_ids)
        self.category_ids: list[int] = [category["id"] for category in manifest.categories]

    @property
    def num_classes(self) -> int:
        return len(self.category_ids) + 1

    def __len__(self) -> int:
        return len(self.image_ids)

    def item(self, image_index: int, sample: Sample) -> dict:
        """The item ``CocoDetection[(image_index, sample.view_index)]`` gives, from the sample's ``jpg`` and
        ``target.json``: ``image`` (3, h, w) float32 0..1, ``target`` boxes (K, 4) xyxy view px, labels (K,)."""
        where = f"image {sample.image_id} (view {sample.view_index}) in store {self.store_path}"
        if "jpg" not in sample.extras or "target.json" not in sample.extras:
            raise PkdError(f"{where} has no image or target: re-extract the store with `extract --with-images`")
        image = decode_image(sample.extras["jpg"], where)
        view_image, _ = apply_view(image, None, self.views[sample.view_index])
        try:
            stored = json.loads(sample.extras["target.json"])
            boxes = torch.tensor(stored["boxes"], dtype=torch.float32).reshape(-1, 4)
            labels = torch.tensor(stored["labels"], dtype=torch.int64).reshape(-1)
        except (ValueError, TypeError, KeyError, RuntimeError, UnicodeDecodeError) as error:
            raise PkdError(f"{where}: target.json is malformed ({error}); re-extract the store") from None
        if len(labels) != len(boxes) or bool(((labels < 1) | (labels > len(self.category_ids))).any()):
            raise PkdError(f"{where}: target.json has {len(boxes)} boxes, {len(labels)} labels, or labels outside "
                           f"1..{len(self.category_ids)}; re-extract the store")
        return {"image": view_image,
                "target": {"boxes": boxes, "labels": labels, "image_id": torch.tensor(sample.image_id)},
                "image_id": sample.image_id, "image_index": image_index, "view_index": sample.view_index,
                "image_hw": tuple(view_image.shape[-2:]), "original_hw": tuple(image.shape[-2:])}


def store_dataset(path: Path | str, views: list[View], student: str) -> StoreImages:
    """The training data of the store at ``path`` alone (no ``--data``); one-line PkdError when the store
    cannot feed training by itself: not WebDataset, no images (not ``--with-images``), no categories, or a
    student that needs masks (a store holds boxes and labels only)."""
    store = open_store(str(path))
    manifest = store.manifest
    fix = "re-extract it with `extract --with-images` (WebDataset), or pass --data DIR"
    if student in USES_MASKS:
        raise PkdError(f"{student} needs instance masks, which a feature store does not hold: pass --data DIR "
                       f"to train it from the data directory")
    if manifest.format != "wds":
        raise PkdError(f"store {path} is {manifest.format}: training without --data reads images from a WebDataset "
                       f"store; {fix}")
    if manifest.n_samples == 0 or not {"jpg", "target.json"} <= set(store.read(0).extras):
        raise PkdError(f"store {path} holds no images and targets (extracted without --with-images); {fix}")
    if manifest.categories is None:
        raise PkdError(f"store {path} records no categories (written by an older version); {fix}")
    return StoreImages(path, manifest, views)


def join_features(item: dict, sample: Sample) -> dict:
    """Add the stored ``teacher_features`` {stride: float32 (C, h, w), or an :class:`EncodedMap` where the
    sample was read with ``keep_encoded``} to a data item of the same image and view.

    The replayed view must give the image size the store recorded, or the join is refused (the
    data changed under the store).
    """
    if tuple(sample.image_hw) != tuple(item["image_hw"]):
        raise PkdError(f"image {item['image_id']} view {item['view_index']} replays to {tuple(item['image_hw'])} px "
                       f"but the store recorded {tuple(sample.image_hw)}: re-extract the store")
    item["teacher_features"] = {s: EncodedMap.from_level(values) if isinstance(values, EncodedLevel)
                                else torch.from_numpy(values) for s, values in sample.features.items()}
    if sample.statistics:  # a projected store: the levels' cross maps come with their float64 sums
        item["teacher_sums"] = {s: (torch.from_numpy(sums["sum"]), torch.from_numpy(sums["sum_sq"]))
                                for s, sums in sample.statistics.items()}
    return item


class StoreJoinedDataset(Dataset):
    """``dataset[(image_index, view_index)]`` plus ``teacher_features`` {stride: float32 (C, h, w)} from the store.

    The store is opened lazily in each DataLoader worker (random access: the zarr way). With
    ``skip_damaged`` a sample the store cannot read comes back as ``{"skipped": reason, ...}``; with
    ``keep_encoded`` the maps stay as the store's codec holds them (EncodedMap), for the device to decode.
    """

    def __init__(self, dataset: CocoDetection, store_path: Path | str, *, skip_damaged: bool = False,
                 keep_encoded: bool = False) -> None:
        self.dataset = dataset
        self.store_path = store_path  # a local path or a URL (s3://...): Path() would mangle a URL
        self.skip_damaged = skip_damaged
        self.keep_encoded = keep_encoded
        self._store: StoreReader | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        if self._store is None:
            self._store = open_store(str(self.store_path))
            self._store.keep_encoded = self.keep_encoded
        item = self.dataset[key]
        try:
            sample = self._store.read(self._store.index_of(item["image_id"], item["view_index"]))
        except StoreError as error:
            if not self.skip_damaged:
                raise
            return {"skipped": str(error), "image_id": item["image_id"], "view_index": item["view_index"]}
        return join_features(item, sample)


SHUFFLE_BUFFER_BYTES = 2**30
"""Bytes of items one DataLoader worker's shuffle buffer may hold (a COCO-size item of fp32 P2..P5 maps, 256 channels x 72,250 values, is about 74 MB; encoded and projected items are smaller)."""


class StoreStream(IterableDataset):
    """Streams a store shard by shard (the WebDataset way): each DataLoader worker, and each rank,
    reads a disjoint set of shards sequentially (in an order shuffled per epoch) and keeps, per image,
    only the view chosen for the epoch (the same choice :class:`ViewSampler` makes), joined with its image
    and target: from the data directory (``dataset`` a :class:`CocoDetection`) or from the sample itself
    (a :class:`StoreImages`).

    A shuffle buffer mixes the order (seeded by seed, epoch, worker): ``shuffle_buffer`` items at most,
    fewer where that many would pass ``SHUFFLE_BUFFER_BYTES`` (``buffer_items``). One epoch yields every
    image once. ``set_epoch`` works as on a sampler. With ``keep_encoded`` the maps stay as the store's
    codec holds them (EncodedMap), for the training device to decode.
    """

    def __init__(self, dataset: CocoDetection | StoreImages, store_path: Path | str, *, seed: int = 0,
                 shuffle_buffer: int = 256, rank: int = 0, num_replicas: int = 1, skip_damaged: bool = False,
                 keep_encoded: bool = False) -> None:
        self.dataset, self.store_path = dataset, store_path
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.rank, self.num_replicas = rank, num_replicas
        self.skip_damaged = skip_damaged
        self.keep_encoded = keep_encoded
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

    def buffer_items(self, manifest) -> int:
        """Items the shuffle buffer holds: ``shuffle_buffer``, at most ``SHUFFLE_BUFFER_BYTES`` of the largest
        item the store can give (its maps at their largest, as float32 or as stored, and its float32 image)."""
        values = sum(level.channels * level.max_height * level.max_width for level in manifest.levels)
        per_value = max(np.dtype(dtype).itemsize for level in manifest.levels
                        for dtype, kind in manifest.level_parts(level.stride).values() if kind == "map") \
            if self.keep_encoded else 4
        finest = min(manifest.levels, key=lambda level: level.stride)
        image = 3 * 4 * finest.max_height * finest.max_width * finest.stride ** 2
        return max(1, min(self.shuffle_buffer, SHUFFLE_BUFFER_BYTES // (values * per_value + image)))

    def __iter__(self):
        store = open_store(str(self.store_path))
        store.keep_encoded = self.keep_encoded
        buffer_items = self.buffer_items(store.manifest)
        sampler = ViewSampler(len(self.dataset), store.manifest.n_views, seed=self.seed)
        sampler.set_epoch(self.epoch)
        chosen = dict(sampler.keys())
        image_index = {image_id: i for i, image_id in enumerate(self.dataset.image_ids)}
        info = get_worker_info()
        generator = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{0 if info is None else info.id}")
        buffer: list[dict] = []
        for sample in self._samples(store, generator):
            if isinstance(sample, dict):  # a damaged-shard marker
                yield sample
                continue
            index = image_index.get(sample.image_id)
            if index is None or chosen[index] != sample.view_index:
                continue
            if isinstance(self.dataset, StoreImages):
                item = self.dataset.item(index, sample)
            else:
                item = self.dataset[(index, sample.view_index)]
            buffer.append(join_features(item, sample))
            if len(buffer) >= buffer_items:
                yield buffer.pop(generator.randrange(len(buffer)))
        generator.shuffle(buffer)
        yield from buffer

    def _samples(self, store: StoreReader, generator: random.Random):
        """This worker's samples shard by shard, its shards in an order ``generator`` shuffles; with
        ``skip_damaged`` the unreadable rest of a shard becomes one ``{"skipped": reason}`` marker instead
        of an error."""
        shards = self._my_shards(store.manifest.n_shards)
        generator.shuffle(shards)
        for k in shards:
            try:
                yield from store.iter_samples([k])
            except StoreError as error:
                if not self.skip_damaged:
                    raise
                yield {"skipped": f"shard {k}: {error}", "image_id": None, "view_index": None}
