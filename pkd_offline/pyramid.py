"""Batching of per-image teacher maps (or their stored projections) and valid-region masks at the
student's padded batch size."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pkd_offline.errors import PkdError
from pkd_offline.projection import TeacherStatistics, place_cross


def level_size(padded_hw: tuple[int, int], stride: int) -> tuple[int, int]:
    """Map size (h, w) at ``stride`` px of a padded input of ``padded_hw`` px (FPN maps round up)."""
    return math.ceil(padded_hw[0] / stride), math.ceil(padded_hw[1] / stride)


def valid_masks(image_hw: list[tuple[int, int]], padded_hw: tuple[int, int], strides: list[int],
                device: torch.device | None = None) -> dict[int, Tensor]:
    """{stride: bool (N, h, w)}: True on each image's unpadded region (ceil(h_i/stride), ceil(w_i/stride))."""
    masks = {}
    for stride in strides:
        height, width = level_size(padded_hw, stride)
        mask = torch.zeros(len(image_hw), height, width, dtype=torch.bool, device=device)
        for i, (h, w) in enumerate(image_hw):
            mask[i, : math.ceil(h / stride), : math.ceil(w / stride)] = True
        masks[stride] = mask
    return masks


def pad_teacher_maps(per_image: list[dict[int, Tensor]], padded_hw: tuple[int, int],
                     device: torch.device | None = None) -> dict[int, Tensor]:
    """Stack per-image maps {stride: (C, h_i, w_i)} into {stride: (N, C, H, W)} zero-padded to the batch size."""
    batch = {}
    for stride in per_image[0]:
        height, width = level_size(padded_hw, stride)
        channels = per_image[0][stride].shape[0]
        stacked = torch.zeros(len(per_image), channels, height, width, device=device)
        for i, maps in enumerate(per_image):
            source = maps[stride]
            h, w = min(source.shape[1], height), min(source.shape[2], width)
            stacked[i, :, :h, :w] = source[:, :h, :w].to(device=device, dtype=stacked.dtype)
        batch[stride] = stacked
    return batch


def projected_statistics(per_image: list[tuple[Tensor, Tensor, Tensor]], image_hw: list[tuple[int, int]],
                         padded_hw: tuple[int, int], teacher_stride: int, student_hw: tuple[int, int],
                         device: torch.device | None = None) -> TeacherStatistics:
    """Batch one level of a projected store: per image (cross (C, h_i, w_i), sum (C,), sum_sq (C,)) as stored,
    for a batch padded to ``padded_hw`` px whose student map is ``student_hw``.

    PkdError unless the teacher frame is exactly twice the student's (the stored projection assumes it).
    """
    teacher_hw = level_size(padded_hw, teacher_stride)
    if teacher_hw != (2 * student_hw[0], 2 * student_hw[1]):
        raise PkdError(f"a projected store level (teacher stride {teacher_stride}) needs a student map of half the "
                       f"teacher's {teacher_hw} in every batch, got {student_hw}: pad batches to a multiple of the "
                       "student stride, or extract a full-map store")
    valid_hw = torch.tensor([level_size(hw, teacher_stride) for hw in image_hw], device=device)
    return TeacherStatistics(
        cross=place_cross([cross for cross, _, _ in per_image], student_hw, device),
        sum=torch.stack([torch.as_tensor(total) for _, total, _ in per_image]).to(device=device, dtype=torch.float64),
        sum_sq=torch.stack([torch.as_tensor(square) for _, _, square in per_image]).to(device=device,
                                                                                        dtype=torch.float64),
        valid_hw=valid_hw, teacher_hw=teacher_hw)
