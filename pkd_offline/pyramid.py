"""Batching of teacher maps (or their stored projections) and valid-region masks at the student's padded batch
size: batched tensor operations, none per image; the per-image sizes reach the device as one copy."""

from __future__ import annotations

import math

import numpy as np

import torch
from torch import Tensor

from pkd_offline.errors import PkdError
from pkd_offline.projection import TeacherStatistics, fold_cross, rectangle_masks
from pkd_offline.stored_batch import fit_trailing, pad_stack, to_device


def level_size(padded_hw: tuple[int, int], stride: int) -> tuple[int, int]:
    """Map size (h, w) at ``stride`` px of a padded input of ``padded_hw`` px (FPN maps round up)."""
    return math.ceil(padded_hw[0] / stride), math.ceil(padded_hw[1] / stride)


def valid_rectangles_at(image_hw: list[tuple[int, int]], strides: list[int],
                        device: torch.device | None = None) -> dict[int, Tensor]:
    """{stride: int64 (N, 2)}: each image's valid (rows, columns) cells at ``stride`` (ceil(h_i/stride),
    ceil(w_i/stride)), on ``device``; computed on the host from the batch's sizes and copied there at once."""
    host = torch.tensor([[level_size(hw, stride) for hw in image_hw] for stride in strides], dtype=torch.int64)
    return dict(zip(strides, to_device(host, device).unbind(0)))


def valid_masks(image_hw: list[tuple[int, int]], padded_hw: tuple[int, int], strides: list[int],
                device: torch.device | None = None) -> dict[int, Tensor]:
    """{stride: bool (N, h, w)}: True on each image's unpadded region (ceil(h_i/stride), ceil(w_i/stride))."""
    masks = {}
    for stride, valid_hw in valid_rectangles_at(image_hw, strides, device).items():
        rows, cols = rectangle_masks(valid_hw, level_size(padded_hw, stride), dtype=torch.bool)
        masks[stride] = rows[:, :, None] & cols[:, None, :]
    return masks


def pad_teacher_maps(per_image: list[dict[int, Tensor]], padded_hw: tuple[int, int],
                     device: torch.device | None = None) -> dict[int, Tensor]:
    """Stack per-image maps {stride: (C, h_i, w_i)} into float32 {stride: (N, C, H, W)} zero-padded (or cropped)
    to the batch size, on ``device`` (the maps' own where None)."""
    batch = {}
    for stride in per_image[0]:
        maps = [maps[stride] for maps in per_image]
        stacked = pad_stack(maps, (maps[0].shape[0], *level_size(padded_hw, stride)))
        batch[stride] = (stacked if device is None else to_device(stacked, device)).float()
    return batch


def check_projected_frame(padded_hw: tuple[int, int], teacher_stride: int, student_hw: tuple[int, int]) -> None:
    """PkdError unless the teacher frame is exactly twice the student's (the stored projection assumes it)."""
    teacher_hw = level_size(padded_hw, teacher_stride)
    if teacher_hw != (2 * student_hw[0], 2 * student_hw[1]):
        raise PkdError(f"a projected store level (teacher stride {teacher_stride}) needs a student map of half the "
                       f"teacher's {teacher_hw} in every batch, got {student_hw}: pad batches to a multiple of the "
                       "student stride, or extract a full-map store")


def stored_cross_hw(valid_hw: tuple[int, int]) -> tuple[int, int]:
    """The (rows, columns) of a stored ``cross`` for an image of ``valid_hw`` teacher cells (``project_image``)."""
    return math.ceil(valid_hw[0] / 2) + 1, math.ceil(valid_hw[1] / 2) + 1


def check_cross_shapes(shapes: list[tuple[int, ...]], image_hw: list[tuple[int, int]], teacher_stride: int,
                       student_hw: tuple[int, int]) -> None:
    """ValueError unless each stored ``cross`` (C, h_i, w_i) has the size its image's projection gives and fits
    the batch frame ``student_hw`` (at most one row and column more); from shapes alone (nothing waits)."""
    for shape, hw in zip(shapes, image_hw):
        if tuple(shape[-2:]) != stored_cross_hw(level_size(hw, teacher_stride)):
            raise ValueError(f"stored projection {tuple(shape)} is not the size an image of {hw} px projects to at "
                             f"stride {teacher_stride}")
        if shape[-2] > student_hw[0] + 1 or shape[-1] > student_hw[1] + 1:
            raise ValueError(f"stored projection {tuple(shape)} exceeds the batch frame {student_hw} by more "
                             "than one")


def batch_statistics(cross: Tensor, sums: Tensor, sums_sq: Tensor, valid_hw: Tensor, padded_hw: tuple[int, int],
                     teacher_stride: int, student_hw: tuple[int, int]) -> TeacherStatistics:
    """One projected level of a batch, from its stacked stored values on one device: ``cross`` (N, C, h, w) as
    decoded (each image's own (h_i, w_i) top-left, whatever past it), ``sums`` and ``sums_sq`` (N, C) float64,
    ``valid_hw`` int64 (N, 2) teacher cells. The frame is checked with :func:`check_projected_frame`."""
    check_projected_frame(padded_hw, teacher_stride, student_hw)
    frame = (student_hw[0] + 1, student_hw[1] + 1)
    cross = fit_trailing(cross, frame)
    stored_hw = torch.div(valid_hw + 1, 2, rounding_mode="floor") + 1
    rows, cols = rectangle_masks(stored_hw, frame)
    return TeacherStatistics(cross=fold_cross(cross * (rows[:, None, :, None] * cols[:, None, None, :])),
                             sum=sums.double(), sum_sq=sums_sq.double(), valid_hw=valid_hw,
                             teacher_hw=level_size(padded_hw, teacher_stride))


def projected_statistics(per_image: list[tuple[Tensor, Tensor, Tensor]], image_hw: list[tuple[int, int]],
                         padded_hw: tuple[int, int], teacher_stride: int, student_hw: tuple[int, int],
                         device: torch.device | None = None) -> TeacherStatistics:
    """Batch one level of a projected store: per image (cross (C, h_i, w_i), sum (C,), sum_sq (C,)) as stored,
    for a batch padded to ``padded_hw`` px whose student map is ``student_hw``.

    PkdError unless the teacher frame is exactly twice the student's (the stored projection assumes it);
    ValueError where a stored cross does not fit its image.
    """
    check_projected_frame(padded_hw, teacher_stride, student_hw)
    check_cross_shapes([cross.shape for cross, _, _ in per_image], image_hw, teacher_stride, student_hw)
    crosses, sums, squares = zip(*per_image)
    where = per_image[0][0].device if device is None else device
    valid_hw = valid_rectangles_at(image_hw, [teacher_stride], where)[teacher_stride]
    return batch_statistics(pad_stack([c.float() for c in crosses]).to(where), torch.stack(sums).to(where),
                            torch.stack(squares).to(where), valid_hw, padded_hw, teacher_stride, student_hw)


def cell_positions(image_hw: list[tuple[int, int]], levels: list[tuple[int, tuple[int, int], int]], channels: int,
                   cells: int, folded: bool, first_value: int = 0) -> np.ndarray:
    """int64 (3, K), one column per cell of one channel (K: every level's and image's cells; the channels are
    expanded on the device, :func:`place_cells`): row 0, where the cell lands in one channel's plane of the
    side-by-side layout (``level_layout``: image n, level cell k at ``n * cells + k``); row 1, where the cell's
    channel-0 value lies in the maps flattened (levels outer, then images, channels, rows, columns), counted from
    ``first_value``; row 2, the step from one channel's value to the next (the cells of that level and image).
    ``levels``: (teacher stride, student frame (Hs, Ws), the level's first cell in an image). ``folded``: the maps
    are stored projections (``stored_cross_hw`` of each image), a row or column past the frame landing on its last
    (:func:`projection.fold_cross`); else each image has the frame."""
    columns, value = [], first_value
    for stride, (height, width), offset in levels:
        for n, hw in enumerate(image_hw):
            rows, cols = stored_cross_hw(level_size(hw, stride)) if folded else (height, width)
            plane = (n * cells + offset + np.minimum(np.arange(rows), height - 1)[:, None] * width
                     + np.minimum(np.arange(cols), width - 1)[None, :]).ravel()
            columns.append(np.stack([plane, value + np.arange(plane.size), np.full(plane.size, plane.size)]))
            value += channels * plane.size
    return np.concatenate(columns, axis=1)


def place_cells(values: Tensor, columns: Tensor, channels: int, plane: int) -> Tensor:
    """Sum ``values`` (the maps flattened as :func:`cell_positions` orders them, float32) into the side-by-side
    layout: float32 (channels, plane); ``columns`` is :func:`cell_positions`'s (3, K) on the values' device. The
    channels are expanded there, so the host builds K indices, not channels x K."""
    into, first, step = columns.unbind(0)
    gather = torch.arange(channels, device=values.device).unsqueeze(1) * step + first
    return values.new_zeros(channels, plane).index_add_(1, into, values.take(gather))
