"""Which (image, view) samples go to which shards and batches, which batches fit a pca basis, and what a resumed
run skips.

Sample ``image_index * n_views + view_index``; a shard is a fixed range of samples (the unit of atomic writes and
of resume). Within a shard, images are batched only with images of the same padded size, so a sample's features
never depend on its batch neighbours (nor on a batch's padding to the fixed batch size).
"""

from __future__ import annotations

import json
from collections import defaultdict

from torch.utils.data import DataLoader, Dataset

from pkd_offline.data import CocoDetection, collate, read_image
from pkd_offline.errors import PkdError
from pkd_offline.views import View, view_padded_size
from storage.manifest import shard_span

FIT_SAMPLES = 32  # samples (image x view) a pca basis is fitted on: the store's first, in shard order

Batch = list[tuple[int, int]]  # (image_index, view_index) keys of one same-size batch


class ExtractionItems(Dataset):
    """``dataset[(image_index, view_index)]``; with ``with_images`` also ``extras``: the image file's bytes
    and ``target.json`` (boxes in the view's pixels, labels), so a WebDataset store can feed training alone."""

    def __init__(self, dataset: CocoDetection, with_images: bool) -> None:
        self.dataset, self.with_images = dataset, with_images

    def __getitem__(self, key: tuple[int, int]) -> dict:
        item = self.dataset[key]
        if self.with_images:
            target = {"boxes": item["target"]["boxes"].tolist(), "labels": item["target"]["labels"].tolist()}
            item["extras"] = {"jpg": self.dataset.image_file(item["image_id"]).read_bytes(),
                              "target.json": json.dumps(target).encode()}
        return item


class ImageProbe(Dataset):
    """``probe[index]``: (image id, None) if the dataset's image ``index`` decodes, else (image id, the reason)."""

    def __init__(self, dataset: CocoDetection) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, str | None]:
        image_id = self.dataset.image_ids[index]
        try:
            read_image(self.dataset.image_file(image_id))
            return image_id, None
        except PkdError as error:
            return image_id, str(error)


def readable_images(dataset: CocoDetection, workers: int) -> tuple[list[int], list[dict]]:
    """Decode every image once (``--on-error skip``): (ids that decode, [{"image_id", "reason"}] that don't)."""
    good, skipped = [], []
    for image_id, reason in DataLoader(ImageProbe(dataset), batch_size=None, num_workers=workers):
        if reason:
            skipped.append({"image_id": image_id, "reason": reason})
        else:
            good.append(image_id)
    return good, skipped


def shard_batches(shards: list[range], dataset: CocoDetection, views: list[View], batch_size: int) -> list[Batch]:
    """Batches of (image_index, view_index) keys: shard by shard (each a range of sample indices, sample =
    image_index * len(views) + view_index), each batch one padded size."""
    batches = []
    for shard in shards:
        groups: dict[tuple[int, int], Batch] = defaultdict(list)
        for index in shard:
            image_index, view_index = divmod(index, len(views))
            hw = view_padded_size(*dataset.original_hw(dataset.image_ids[image_index]), views[view_index])
            groups[hw].append((image_index, view_index))
        for keys in groups.values():
            batches.extend(keys[i : i + batch_size] for i in range(0, len(keys), batch_size))
    return batches


def first_batches(batches: list[Batch], samples: int) -> list[Batch]:
    """The shortest prefix of ``batches`` holding at least ``samples`` samples (all of them if fewer)."""
    count = 0
    for i, keys in enumerate(batches):
        count += len(keys)
        if count >= samples:
            return batches[:i + 1]
    return batches


def shared_prefix(first: list[Batch], second: list[Batch]) -> int:
    """How many leading batches ``first`` and ``second`` have in common."""
    count = 0
    while count < min(len(first), len(second)) and first[count] == second[count]:
        count += 1
    return count


class ShardPlan:
    """The store's samples of ``dataset`` x ``views`` in shards of ``samples_per_shard``, batched by ``batch_size``
    within each shard."""

    def __init__(self, dataset: CocoDetection, views: list[View], samples_per_shard: int, batch_size: int) -> None:
        self.dataset, self.views = dataset, views
        self.samples_per_shard, self.batch_size = samples_per_shard, batch_size
        self.n_samples = len(dataset.image_ids) * len(views)
        self.n_shards = -(-self.n_samples // samples_per_shard)

    def shard(self, k: int) -> range:
        """Shard ``k``'s sample indices."""
        return shard_span(k, self.samples_per_shard, self.n_samples)

    def batches(self, shards: list[int] | range) -> list[Batch]:
        """The batches of ``shards``, in order."""
        return shard_batches([self.shard(k) for k in shards], self.dataset, self.views, self.batch_size)

    def fit_batches(self, samples: int = FIT_SAMPLES) -> list[Batch]:
        """The batches a pca basis is fitted on: the store's first ``samples`` samples in shard order (whatever the
        number of ranks, so a re-run fits the same basis), rounded up to whole batches."""
        shards = range(min(self.n_shards, -(-samples // self.samples_per_shard)))
        return first_batches(self.batches(shards), samples)

    def todo(self, rank: int, world_size: int, done: set[int] | frozenset[int]) -> list[int]:
        """The shards rank ``rank`` of ``world_size`` writes (``k % world_size == rank``) that are not in ``done``."""
        return [k for k in range(rank, self.n_shards, world_size) if k not in done]

    def samples_in(self, shards: list[int] | set[int] | frozenset[int]) -> int:
        """How many samples ``shards`` hold."""
        return sum(len(self.shard(k)) for k in shards)

    def images_in(self, shards: list[int]) -> int:
        """How many distinct images the samples of ``shards`` show."""
        return len({index // len(self.views) for k in shards for index in self.shard(k)})

    def loader(self, batches: list[Batch], *, with_images: bool, workers: int, pin_memory: bool) -> DataLoader:
        """A loader of ``batches`` (each a list of item dicts, ``pkd_offline.data.collate``)."""
        return DataLoader(ExtractionItems(self.dataset, with_images), batch_sampler=batches, collate_fn=collate,
                          num_workers=workers, pin_memory=pin_memory)
