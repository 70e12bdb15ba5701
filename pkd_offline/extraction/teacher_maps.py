"""One same-size batch through the teacher's backbone+FPN on its device: the maps (or their projections) and
their finiteness checks, launched without waiting for the device."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from pkd_offline.precision import forward_autocast
from pkd_offline.projection import project_images
from pkd_offline.pyramid import level_size


@dataclass
class TeacherMaps:
    """One same-size batch's teacher maps on the teacher's device, nothing yet read back from it.

    ``levels`` {stride: [(image positions in the batch, (n, C, h, w) float32)]}: the maps (one group: the whole
    batch), or for a projected stride their projections, one group per valid size (each image's own size);
    ``statistics`` {projected stride: ((N, C) sums, (N, C) sums of squares) float64} of the maps themselves;
    ``finite`` (levels, N) bool: whether every value of image i at ``strides[j]`` (and its statistics) is finite.
    """

    levels: dict[int, list[tuple[list[int], Tensor]]]
    statistics: dict[int, tuple[Tensor, Tensor]]
    finite: Tensor


def padded_images(images: list[Tensor], pad_to: int | None) -> list[Tensor]:
    """``images`` followed by copies of the last one up to ``pad_to`` images (None, or no fewer: as they are), so
    every batch of one padded size has one shape and a CUDA graph captured for it serves the whole run."""
    if pad_to is None or len(images) >= pad_to:
        return images
    return images + [images[-1]] * (pad_to - len(images))


@torch.inference_mode()
def teacher_levels(teacher, batch: list[dict], strides: list[int], device: torch.device,
                   projected: frozenset[int] = frozenset(), backbone=None, pad_to: int | None = None) -> TeacherMaps:
    """The teacher's FPN maps of one same-size batch (``TeacherMaps``), a stride in ``projected`` replaced by
    its projection for a student of twice the stride (``project_images``, one call per valid size in the
    batch). Only launches work on the device: nothing here waits for it (``finish`` reads the checks).
    ``backbone``: a stand-in for the teacher's backbone+FPN (``graphed_backbone``; None: the teacher's own);
    ``pad_to``: the forward runs on the batch padded to this many images (``padded_images``), the padding rows'
    maps dropped."""
    images = [item["image"].to(device, non_blocking=True) for item in batch]
    with forward_autocast(device):
        features, _ = teacher.features(padded_images(images, pad_to), backbone)
    features = {s: features[s][:len(batch)] for s in strides}
    everyone = list(range(len(batch)))
    levels: dict[int, list[tuple[list[int], Tensor]]] = {}
    statistics: dict[int, tuple[Tensor, Tensor]] = {}
    finite = torch.ones(len(strides), len(batch), dtype=torch.bool, device=features[strides[0]].device)
    for j, s in enumerate(strides):
        if s not in projected:
            levels[s] = [(everyone, features[s].float())]
        else:
            levels[s], statistics[s] = projections(features[s], batch, s)
            total, square = statistics[s]
            finite[j] &= torch.isfinite(total.sum(dim=1) + square.sum(dim=1))
        # A map's max and min are finite exactly when all its values are (NaN and Inf reach them).
        for indices, maps in levels[s]:
            flat = maps.flatten(1)
            rows = device_rows(indices, len(batch), finite.device)
            finite[j, rows] &= torch.isfinite(flat.amax(dim=1) + flat.amin(dim=1))
    return TeacherMaps(levels, statistics, finite)


def projections(features: Tensor, batch: list[dict], stride: int) -> tuple[list[tuple[list[int], Tensor]],
                                                                           tuple[Tensor, Tensor]]:
    """The projections of ``features`` ((N, C, h, w), stride ``stride`` px) for a student of twice the stride:
    ([(image positions, (n, C, h', w') projections)] one group per valid size, ((N, C) sums, (N, C) sums of
    squares) float64 of the maps)."""
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, item in enumerate(batch):
        by_size[level_size(item["image_hw"], stride)].append(i)
    groups = []
    total = features.new_zeros(len(batch), features.shape[1], dtype=torch.float64)
    square = total.clone()
    for valid_hw, indices in by_size.items():
        rows = device_rows(indices, len(batch), total.device)
        cross, total[rows], square[rows] = project_images(features[rows], valid_hw)
        groups.append((indices, cross))
    return groups, (total, square)


def device_rows(indices: list[int], size: int, device: torch.device) -> slice | Tensor:
    """An index of ``indices`` (positions in a batch of ``size``) that does not wait for the device: a slice for
    the whole batch, else an int64 tensor copied from page-locked memory (a Python list would be copied from
    pageable memory, which waits for all queued work)."""
    if indices == list(range(size)):
        return slice(None)
    rows = torch.tensor(indices, dtype=torch.int64)
    return rows.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else rows
