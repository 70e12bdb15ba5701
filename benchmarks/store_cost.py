"""The store's cost on the paper pair : bytes against the fp32 maps it replaces, the per-value
codec alone, how fast the default workers decode it, and how faithfully the PKD gradient survives it.

Called by ``benchmarks/paper_pair.py`` on the stores it extracts (the default codec and layout) plus an fp32 store
of the same layout and images, the exact reference. Keys:

- ``index_store_bytes_over_fp32_maps``: the store's level bytes on disk over the float32 teacher P2..P5 maps it
  replaces (``storage.describe``'s ``fp32_bytes_per_image``: for a projected level the full teacher map at the
  view's padded size);
- ``bytes_ratio_default_codec_over_fp32``: the codec's parts alone (not a projected level's float64 sums) over the
  same values as float32, i.e. what the per-value codec saves on the values the store holds;
- ``decode_rate_over_consumption``: samples/s that ``workers`` DataLoader workers read and decode to float32 (the
  CPU training path; on a GPU the device decodes) over the samples/s the student consumes alone;
- ``grad_cosine_default``: the lowest, over batches, cosine between the PKD gradient with respect to the
  student's maps (the random-init paper student's own FPN maps of the batch) with the decoded store and with the
  exact fp32 store, all levels together.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from pkd_offline.data import CocoDetection, collate
from pkd_offline.engine import Distillation, distillation_loss
from pkd_offline.levels import pair_levels
from pkd_offline.store_data import StoreJoinedDataset, store_views
from storage import describe, open_store
from storage.manifest import STATISTIC_PARTS


def store_bytes(store: Path) -> dict:
    """``index_store_bytes_over_fp32_maps`` and ``bytes_ratio_default_codec_over_fp32`` of a zarr store."""
    reader = open_store(str(store))
    summary = describe(reader)
    levels = summary["levels"].values()
    whole = sum(level["bytes_per_image"] for level in levels) / sum(level["fp32_bytes_per_image"] for level in levels)
    reader.keep_encoded = True
    values = {level.stride: 0 for level in reader.manifest.levels}
    for sample in reader.iter_samples():
        for stride, level in sample.features.items():
            values[stride] += math.prod(level.shape)
    codec_bytes = sum(reader.location.tree_bytes(f"s{stride}/{part}") for stride in values
                      for part in reader.manifest.level_parts(stride) if part not in STATISTIC_PARTS)
    return {"index_store_bytes_over_fp32_maps": whole,
            "bytes_ratio_default_codec_over_fp32": codec_bytes / (4 * sum(values.values())),
            "store_bytes_per_image": summary["bytes_per_image"], "codec": reader.manifest.codec,
            "layout": reader.manifest.layout["name"]}


class Decoded(Dataset):
    """Sample ``i`` of a store, read and decoded to float32 (what a CPU worker does each step)."""

    def __init__(self, store: Path) -> None:
        self.store, self.reader = store, None

    def __len__(self) -> int:
        return len(open_store(str(self.store)))

    def __getitem__(self, index: int) -> int:
        self.reader = self.reader or open_store(str(self.store))
        sample = self.reader.read(index)
        return sum(int(level.size) for level in sample.features.values())


def decode_rate(store: Path, workers: int, rounds: int) -> float:
    """Median samples/s of ``workers`` DataLoader workers reading and decoding every sample of the store."""
    loader = DataLoader(Decoded(store), batch_size=None, num_workers=workers, persistent_workers=workers > 0)
    rates = []
    for _ in range(rounds + 1):  # the first round starts the workers: not counted
        tick = time.perf_counter()
        count = sum(1 for _ in loader)
        rates.append(count / (time.perf_counter() - tick))
    return statistics.median(rates[1:])


def grad_cosine(data: Path, store: Path, exact: Path, student, batch_size: int, device: torch.device) -> float:
    """The lowest cosine over batches between the PKD gradients (w.r.t. the student's maps) from ``store`` and
    from ``exact`` (same images, same layout)."""
    views = store_views(store)
    dataset = CocoDetection(data, "train", views)
    stores = {name: StoreJoinedDataset(dataset, path) for name, path in (("store", store), ("exact", exact))}
    strides = [level.stride for level in open_store(str(store)).manifest.levels]
    distill = Distillation(pair_levels(list(student.strides), strides, "index"), 6.0)
    cosines = []
    keys = [(i, 0) for i in range(len(dataset))]
    for start in range(0, len(keys), batch_size):
        batches = {name: collate([joined[key] for key in keys[start:start + batch_size]])
                   for name, joined in stores.items()}
        images = [item["image"].to(device) for item in batches["exact"]]
        with torch.no_grad():
            maps, _ = student.features(images)
        grads = {}
        for name, batch in batches.items():
            leaves = {s: maps[s].detach().clone().requires_grad_(True) for s, _ in distill.pairs}
            loss = distillation_loss(leaves, batch, images, distill, 32, device)
            grads[name] = torch.cat([g.ravel() for g in torch.autograd.grad(loss, list(leaves.values()))]).double()
        a, b = grads["store"], grads["exact"]
        cosines.append(float(a @ b / (a.norm() * b.norm())))
    return min(cosines)
