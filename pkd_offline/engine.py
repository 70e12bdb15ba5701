"""The training loop shared by plain, offline-PKD and online-PKD training.

One step: ``L = L_det + alpha * L_pkd``, where ``L_pkd`` compares the student's FPN maps (from the
same forward as ``L_det``) with teacher maps that come either from the batch (a feature store) or
from a teacher forward (online). With no teacher, ``L = L_det``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from pkd_offline.device_images import decode_on
from pkd_offline.errors import PkdError
from pkd_offline.level_layout import FlatStatistics
from pkd_offline.loss import pcc_over_levels, pkd_loss
from pkd_offline.models import FeatureDetector
from pkd_offline.mse_loss import mse_from_statistics
from pkd_offline.precision import forward_autocast
from pkd_offline.projection import TeacherStatistics, statistics_from_maps
from pkd_offline.pyramid import (batch_statistics, cell_positions, check_cross_shapes, check_projected_frame,
                                 level_size, pad_teacher_maps, place_cells, valid_masks, valid_rectangles_at)
from pkd_offline.stored_batch import fit_trailing, stored_cells, stored_levels, to_device
from pkd_offline.views import padded_size


@dataclass
class Distillation:
    """How the PKD term is formed: (student_stride, teacher_stride) pairs, weight ``alpha`` per level,
    and the online ``teacher`` (None: teacher maps come with each item as ``teacher_features``).
    ``per_image``: the online teacher runs on each image alone, at the image's own padded size, and its
    maps are zero-padded to the batch like stored maps (the control for offline vs online)."""

    pairs: list[tuple[int, int]]
    alpha: float
    teacher: FeatureDetector | None = None
    per_image: bool = False
    loss: str = "pcc"  # a LEVEL_LOSSES name: "pcc" (PKD) or "mse" (plain imitation, the paper's comparison)


LEVEL_LOSSES = {"pcc": None, "mse": mse_from_statistics}  # per level, from statistics; None: loss.pcc_loss

def batch_padded_hw(batch: list[dict], size_divisor: int) -> tuple[int, int]:
    """The (H, W) px the detector transform pads this batch to."""
    height = max(item["image"].shape[-2] for item in batch)
    width = max(item["image"].shape[-1] for item in batch)
    return padded_size(height, width, size_divisor)


def stored_teacher_levels(batch: list[dict], strides: list[int], padded_hw: tuple[int, int],
                          device: torch.device) -> dict[int, Tensor]:
    """{teacher_stride: float32 (N, C, H, W)} of the batch's stored maps at the batch's padded size (cells past
    an image's own map: what its codec decodes from zero codes; callers mask them), one decode per level."""
    levels = stored_levels({t: [item["teacher_features"][t] for item in batch] for t in strides}, device)
    return {t: fit_trailing(levels[t], level_size(padded_hw, t)) for t in strides}


def teacher_maps(batch: list[dict], images: list[Tensor], distill: Distillation, padded_hw: tuple[int, int],
                 device: torch.device, skip: frozenset[int] = frozenset()) -> dict[int, Tensor]:
    """{teacher_stride: (N, C, H, W)} at the batch's padded size, from the store or an online forward
    (strides in ``skip``, the levels a projected store holds as statistics, are left out)."""
    strides = [t for _, t in distill.pairs if t not in skip]
    if distill.teacher is None:
        return stored_teacher_levels(batch, strides, padded_hw, device)
    with torch.no_grad():
        if distill.per_image:
            per_image = [{t: maps[t][0].float() for t in strides}
                         for maps, _ in (distill.teacher.features([image]) for image in images)]
            return pad_teacher_maps(per_image, padded_hw, device)
        features, _ = distill.teacher.features(images)
    return {t: features[t].float() for t in strides}


def stored_statistics(batch: list[dict], strides: list[int], padded_hw: tuple[int, int],
                      student_hw: dict[int, tuple[int, int]], device: torch.device) -> dict[int, TeacherStatistics]:
    """{teacher_stride: TeacherStatistics} of the levels a projected store holds, for the whole batch at once:
    one decode per level, the float64 sums in one copy; shapes are checked on the host (nothing waits)."""
    image_hw = [item["image_hw"] for item in batch]
    for t in strides:
        check_cross_shapes([item["teacher_features"][t].shape for item in batch], image_hw, t, student_hw[t])
    cross = stored_levels({t: [item["teacher_features"][t] for item in batch] for t in strides}, device)
    sums = torch.stack([item["teacher_sums"][t][k] for t in strides for k in (0, 1) for item in batch])
    sums = to_device(sums, device).unflatten(0, (len(strides), 2, len(batch)))
    valid_hw = valid_rectangles_at(image_hw, strides, device)
    return {t: batch_statistics(cross[t], sums[i, 0], sums[i, 1], valid_hw[t], padded_hw, t, student_hw[t])
            for i, t in enumerate(strides)}


def check_channels(shapes: list[tuple[int, ...]], channels: int, strides: int | list[int]) -> None:
    """ValueError unless every teacher map of these (C, H, W) shapes has the student's ``channels``."""
    found = sorted({shape[0] for shape in shapes} - {channels})
    if found:
        raise ValueError(f"teacher maps at stride {strides} have {found} channels, the student's {channels}")


def pyramid_targets(batch: list[dict], images: list[Tensor], distill: Distillation, padded_hw: tuple[int, int],
                    student_hw: dict[int, tuple[int, int]], channels: int,
                    device: torch.device) -> tuple[list[int], FlatStatistics]:
    """The teacher side of the PCC term for all paired levels at once: (teacher strides in the order of the
    levels, their :class:`FlatStatistics`); ``student_hw``: {teacher_stride: the paired student map's (h, w)},
    ``channels`` theirs (ValueError where a teacher level has other channels).

    Levels a projected store holds (items with ``teacher_sums``) come first, their stored ``cross`` maps decoded
    together (``stored_batch.stored_cells``) and placed, folded, in one scatter; the others are reduced from maps
    (``teacher_maps``). Sizes are checked and positions computed on the host (nothing waits for the device)."""
    strides = [t for _, t in distill.pairs]
    stored_sums = batch[0].get("teacher_sums", {}) if distill.teacher is None else {}
    projected = [t for t in strides if t in stored_sums]
    mapped = [t for t in strides if t not in stored_sums]
    order, image_hw = projected + mapped, [item["image_hw"] for item in batch]
    offsets = np.cumsum([0] + [math.prod(student_hw[t]) for t in order]).tolist()
    levels = [(t, student_hw[t], offset) for t, offset in zip(order, offsets)]
    valid_hw = valid_rectangles_at(image_hw, order, device)
    values, positions, sums = [], [], []
    teacher_hw = {t: level_size(padded_hw, t) for t in order}
    if projected:
        for t in projected:
            check_projected_frame(padded_hw, t, student_hw[t])
            shapes = [item["teacher_features"][t].shape for item in batch]
            check_cross_shapes(shapes, image_hw, t, student_hw[t])
            check_channels(shapes, channels, t)
        values.append(stored_cells([item["teacher_features"][t] for t in projected for item in batch], device))
        positions.append(cell_positions(image_hw, levels[:len(projected)], channels, offsets[-1], folded=True))
        host = torch.stack([item["teacher_sums"][t][k] for k in (0, 1) for t in projected for item in batch])
        sums.append(to_device(host, device).unflatten(0, (2, len(projected), len(batch))).sum(dim=2,
                                                                                         dtype=torch.float64))
    if mapped:
        maps = teacher_maps(batch, images, distill, padded_hw, device, skip=frozenset(projected))
        check_channels([maps[t].shape[1:] for t in mapped], channels, mapped)
        valid = valid_masks(image_hw, padded_hw, mapped, device)
        statistics = [statistics_from_maps(maps[t], valid_hw[t], student_hw[t], valid[t]) for t in mapped]
        first_value = values[0].numel() if projected else 0  # the mapped levels' values follow the stored ones
        values.extend(level.cross.flatten() for level in statistics)
        teacher_hw.update((t, level.teacher_hw) for t, level in zip(mapped, statistics))
        positions.append(cell_positions(image_hw, levels[len(projected):], channels, offsets[-1], folded=False,
                                        first_value=first_value))
        sums.append(torch.stack([level.sum for level in statistics] + [level.sum_sq for level in statistics])
                    .sum(dim=1, dtype=torch.float64).unflatten(0, (2, len(mapped))))
    cells = torch.cat(values) if len(values) > 1 else values[0]
    columns = to_device(torch.from_numpy(np.concatenate(positions, axis=1)), device)
    cross = place_cells(cells, columns, channels, len(batch) * offsets[-1])
    return order, FlatStatistics(cross, torch.cat(sums, dim=1) if len(sums) > 1 else sums[0],
                                 torch.stack([valid_hw[t] for t in order]), [student_hw[t] for t in order],
                                 [teacher_hw[t] for t in order])


@dataclass
class DistillationTargets:
    """The teacher side of one batch's PKD term (:func:`distillation_targets`): all paired levels side by side
    (``levels``, the teacher strides in their order, and ``flat``), or per level (``per_level``: a map or its
    statistics, ``valid``: masks of the map levels)."""

    levels: list[int]
    flat: FlatStatistics | None = None
    per_level: dict[int, Tensor | TeacherStatistics] = field(default_factory=dict)
    valid: dict[int, Tensor] = field(default_factory=dict)


def distillation_targets(student: dict[int, Tensor], batch: list[dict], images: list[Tensor], distill: Distillation,
                         size_divisor: int, device: torch.device) -> DistillationTargets:
    """The teacher side of the PKD term for ``student`` maps keyed by their paired teacher stride: for the PCC
    with one channel count, every level at once (:func:`pyramid_targets`); else per level."""
    padded_hw = batch_padded_hw(batch, size_divisor)
    if distill.loss == "pcc" and len({tuple(m.shape[:2]) for m in student.values()}) == 1:
        order, flat = pyramid_targets(batch, images, distill, padded_hw,
                                      {t: tuple(m.shape[-2:]) for t, m in student.items()},
                                      next(iter(student.values())).shape[1], device)
        return DistillationTargets(order, flat)
    stored_sums = batch[0].get("teacher_sums", {}) if distill.teacher is None else {}
    projected = [t for _, t in distill.pairs if t in stored_sums]
    teacher: dict[int, Tensor | TeacherStatistics] = dict(teacher_maps(batch, images, distill, padded_hw, device,
                                                                       skip=frozenset(projected)))
    valid = valid_masks([item["image_hw"] for item in batch], padded_hw, list(teacher), device)
    if projected:
        teacher.update(stored_statistics(batch, projected, padded_hw,
                                         {t: tuple(student[t].shape[-2:]) for t in projected}, device))
    return DistillationTargets([t for _, t in distill.pairs], per_level=teacher, valid=valid)


def distillation_term(student: dict[int, Tensor], targets: DistillationTargets, distill: Distillation) -> Tensor:
    """``alpha * pkd_loss`` (scalar float32) of ``student`` maps keyed by teacher stride against ``targets``."""
    if targets.flat is not None:
        return distill.alpha * pcc_over_levels([student[t] for t in targets.levels], targets.flat)
    return distill.alpha * pkd_loss(student, targets.per_level, targets.valid, level_loss=LEVEL_LOSSES[distill.loss])


def distillation_loss(student_features: dict[int, Tensor], batch: list[dict], images: list[Tensor],
                      distill: Distillation, size_divisor: int, device: torch.device) -> Tensor:
    """``alpha * pkd_loss`` (with ``distill.loss``'s level loss) over the valid region of each image (scalar
    float32). Levels a projected store holds (items with ``teacher_sums``) enter as their statistics, the others
    as maps. The batch is handled with batched operations (none per image), the PCC over all levels of one
    channel count in one pass (:func:`pyramid_targets`, ``loss.pcc_over_levels``), and the host never waits for
    the device."""
    student = {t: student_features[s] for s, t in distill.pairs}
    return distillation_term(student, distillation_targets(student, batch, images, distill, size_divisor, device),
                             distill)


def lr_factor(iteration: int, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate multiplier: linear warm-up from 0.001, then cosine to 0 or steps x0.1 at 2/3 and 8/9."""
    if iteration < warmup:
        return 0.001 + (1 - 0.001) * iteration / warmup
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (iteration - warmup) / max(1, total - warmup)))
    return 0.1 ** sum(iteration >= total * f for f in (2 / 3, 8 / 9))


@dataclass
class LoopState:
    iteration: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    skipped: list[dict] = field(default_factory=list)  # damaged samples left out (``--on-error skip``)


def training_step(model: FeatureDetector, batch: list[dict], optimizer: torch.optim.Optimizer, *,
                  device: torch.device, distill: Distillation | None, size_divisor: int) -> dict[str, float]:
    """One optimiser step on ``batch`` (AMP bf16 on CUDA); returns loss, loss_det, loss_pkd and each
    detection term as floats. Raises FloatingPointError, before any update, if the loss is not finite."""
    model.train()
    batch = decode_on(batch, device)
    images = [item["image"].to(device, non_blocking=True) for item in batch]
    targets = [{k: v.to(device) for k, v in item["target"].items()} for item in batch]
    with forward_autocast(device):
        losses, student_features = model(images, targets)
        loss_det = sum(losses.values())
        loss_pkd = (distillation_loss(student_features, batch, images, distill, size_divisor, device)
                    if distill is not None else torch.zeros((), device=device))
    loss = loss_det + loss_pkd
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    optimizer.step()
    return {"loss": loss.item(), "loss_det": loss_det.item(), "loss_pkd": loss_pkd.item(),
            **{k: v.item() for k, v in losses.items()}}


def train_steps(model: FeatureDetector, loader, sampler, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, state: LoopState, total_iters: int, *,
                device: torch.device, distill: Distillation | None, size_divisor: int, log_path: Path,
                on_step: Callable[[LoopState], None] = lambda state: None, progress: bool = True) -> LoopState:
    """Run SGD steps until ``state.iteration == total_iters``, appending one JSON line per step to ``log_path``.

    ``sampler`` orders each epoch: a ``ViewSampler`` (map-style data) or a streaming dataset; both
    have ``set_epoch``. A resumed state starts mid-epoch where it stopped.

    Each line holds iter, epoch, lr, loss, loss_det, loss_pkd, every detection loss term, sec (the
    whole step, data loading included) and data_sec. ``on_step`` runs after each step (checkpoints,
    evaluation). Items marked ``skipped`` (damaged store samples under ``--on-error skip``) are
    left out of their batch, reported and collected in ``state.skipped``. A non-finite loss stops with a PkdError naming the step and the batch's image ids.
    """
    bar = tqdm(total=total_iters, initial=state.iteration, desc="train", unit="it", disable=not progress)
    with open(log_path, "a") as log:
        while state.iteration < total_iters:
            sampler.set_epoch(state.epoch)
            if hasattr(sampler, "skip"):  # a sampler skips the keys a resumed run already saw
                sampler.skip = state.step_in_epoch * loader.batch_size
                batches = iter(loader)
            else:  # a stream replays its epoch and drops the batches already seen
                batches = iter(loader)
                for _ in range(state.step_in_epoch):
                    next(batches, None)
            tick = time.perf_counter()
            for batch in batches:
                data_sec = time.perf_counter() - tick
                damaged = [item for item in batch if "skipped" in item]
                for item in damaged:
                    tqdm.write(f"pkd-offline: skipped: {item['skipped']}", file=sys.stderr)
                state.skipped.extend(damaged)
                batch = [item for item in batch if "skipped" not in item]
                if not batch:
                    continue
                try:
                    terms = training_step(model, batch, optimizer, device=device, distill=distill,
                                          size_divisor=size_divisor)
                except FloatingPointError:
                    ids = [item["image_id"] for item in batch]
                    raise PkdError(f"non-finite loss at step {state.iteration + 1} (images {ids}): lower --lr or "
                                   f"check the data; the last checkpoint is kept") from None
                scheduler.step()
                state.iteration += 1
                state.step_in_epoch += 1
                record = {"iter": state.iteration, "epoch": state.epoch, "lr": optimizer.param_groups[0]["lr"],
                          **terms, "sec": time.perf_counter() - tick, "data_sec": data_sec}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", pkd=f"{record['loss_pkd']:.3f}")
                on_step(state)
                if state.iteration >= total_iters:
                    break
                tick = time.perf_counter()
            else:
                state.epoch += 1
                state.step_in_epoch = 0
    bar.close()
    return state
