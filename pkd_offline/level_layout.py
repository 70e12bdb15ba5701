"""Several pyramid levels side by side: the student side of the PKD loss for all levels in one pass.

Each level's (N, C, Hs, Ws) map is flattened and the levels are concatenated, then the channels lead: one
(C, N * P) tensor, P the cells of one image over all levels (position ``n * P + offset_l + i * Ws_l + j``). Per
level and channel sums are then one matrix product with a (N * P, L) weight matrix (a level's column is zero
off that level), and ``U^T W U`` (:class:`projection.StudentOperators`, a Kronecker product of two symmetric
tridiagonal matrices per image) enters as its quadratic form, from four neighbours of each cell (itself, one
column on, one row on, one row and column on) and one gather:

``v^T (R (x) C) v = sum K00 v^2 + 2 K01 v v01 + 2 K10 v v10 + 2 K11 (v v11 + v01 v10)``

with ``K00 = Rd Cd``, ``K01 = Rd Cu``, ``K10 = Ru Cd``, ``K11 = Ru Cu`` (``d`` diagonal, ``u`` upper at the cell's
row i and column j; ``u`` is zero on a level's last row or column, so no term leaves its level).

Everything that depends only on the sizes (the gather's indices, which factor each cell takes) is built once on
the host per sizes and device (:func:`flat_layout`); what depends on the valid rectangles is a lookup on the
device (:func:`flat_operators`), so the number of operators is the same for any batch and any number of levels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pkd_offline.projection import TeacherStatistics, axis_table
from pkd_offline.stored_batch import to_device


@dataclass
class FlatLayout:
    """The constant part of :func:`flat_operators` for N images and levels of given student and teacher sizes.

    Attributes:
        table: float32 (R, 3, S): each (level, axis)'s ``axis_table`` stacked, padded with zeros to S columns.
        table_offset: int64 (L, 1, 2): the first row of each (level, axis) in ``table``.
        factor_base, factor_kind: int64 (2, 1, N * P) and (2, 5, 1), whose sum says for each cell where its row
            (0) and column (1) factors lie in the looked-up factors flattened, for the products mean, K00, K01,
            K10, K11.
        neighbour_index: int64 (3 * N * P,): the cells one column on, one row on, one row and column on (the cell
            itself where that leaves the level: its coefficient is zero there).
        level_index: int64 (N * P,): each cell's level.
        level_onehot: float32 (N * P, L).
    """

    table: Tensor
    table_offset: Tensor
    factor_base: Tensor
    factor_kind: Tensor
    neighbour_index: Tensor
    level_index: Tensor
    level_onehot: Tensor


@dataclass
class FlatOperators:
    """:func:`flat_operators`: the layout and, per cell, the quadratic form's coefficients.

    Attributes:
        layout: the :class:`FlatLayout`.
        mean_weight: float32 (N * P, L): ``U^T w`` of each cell in its level's column.
        diagonal: float32 (N * P,): ``K00``.
        neighbours: float32 (3, N * P): ``2 K01``, ``2 K10``, ``2 K11``.
        corner: float32 (N * P,): ``2 K11`` (the product of the cells one column on and one row on).
    """

    layout: FlatLayout
    mean_weight: Tensor
    diagonal: Tensor
    neighbours: Tensor
    corner: Tensor

    def quadratic_density(self, values: Tensor) -> Tensor:
        """(C, N * P) -> (C, N * P) whose per-level sums are ``v^T U^T W U v`` per channel."""
        gathered = values.index_select(1, self.layout.neighbour_index).unflatten(1, (3, -1))
        right, down, _ = gathered.unbind(1)
        return values * (self.diagonal * values + (self.neighbours * gathered).sum(dim=1)) + self.corner * right * down


_LAYOUTS: dict[tuple, FlatLayout] = {}
KEPT_LAYOUTS = 16  # layouts kept at most (one per batch size and frame; a few int64 values per cell of a batch)


def flat_layout(images: int, student_hw: list[tuple[int, int]], teacher_hw: list[tuple[int, int]],
                device: torch.device) -> FlatLayout:
    """The :class:`FlatLayout` of ``images`` images and levels of these student and teacher (H, W) cells, on
    ``device``; built once per sizes and device (one image's cells, repeated per image by broadcasting)."""
    key = (images, tuple(student_hw), tuple(teacher_hw), str(device))
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    tables = [axis_table(s[axis], t[axis]) for s, t in zip(student_hw, teacher_hw) for axis in (0, 1)]
    width = max(table.shape[-1] for table in tables)
    starts = np.cumsum([0] + [table.shape[0] for table in tables])[:-1]
    cells = [np.arange(h * w) for h, w in student_hw]
    level = np.concatenate([np.full(c.size, n) for n, c in enumerate(cells)])  # one image's cells
    row = np.concatenate([c // w for c, (_, w) in zip(cells, student_hw)])
    col = np.concatenate([c % w for c, (_, w) in zip(cells, student_hw)])
    height_of, width_of = (np.array([hw[axis] for hw in student_hw])[level] for axis in (0, 1))
    own = np.arange(level.size)
    right = np.where(col + 1 < width_of, own + 1, own)
    down = np.where(row + 1 < height_of, own + width_of, own)
    corner = np.where((row + 1 < height_of) & (col + 1 < width_of), own + width_of + 1, own)
    image = np.arange(images)[:, None]
    # factors looked up as (L, N, 2, 3, S) and flattened: level l, image n, axis a, kind k, index x
    base = (level * images)[None] * 6 * width + image * 6 * width
    factor_base = np.stack([base + row, base + 3 * width + col]).reshape(2, 1, -1)
    kinds = np.array([[0, 1, 1, 2, 2], [0, 1, 2, 1, 2]])[:, :, None] * width  # mean, K00, K01, K10, K11
    neighbours = (np.stack([right, down, corner])[:, None] + image * level.size).reshape(-1)
    level_of = np.tile(level, images)
    padded = [torch.nn.functional.pad(table, (0, width - table.shape[-1])) for table in tables]
    onehot = torch.nn.functional.one_hot(torch.from_numpy(level_of), len(student_hw)).float()
    host = [torch.cat(padded), torch.from_numpy(starts.reshape(len(student_hw), 1, 2)), torch.from_numpy(factor_base),
            torch.from_numpy(kinds), torch.from_numpy(neighbours), torch.from_numpy(level_of), onehot]
    layout = FlatLayout(*(to_device(tensor, device) for tensor in host))  # page-locked copies: nothing waits
    if len(_LAYOUTS) >= KEPT_LAYOUTS:
        _LAYOUTS.clear()
    _LAYOUTS[key] = layout
    return layout


def flat_operators(layout: FlatLayout, valid_hw: Tensor) -> FlatOperators:
    """:class:`FlatOperators` for int64 (L, N, 2) valid rectangles (teacher cells) on the layout's device."""
    factors = layout.table[valid_hw + layout.table_offset].flatten()  # (L, N, 2, 3, S) looked up
    row, col = (layout.factor_base + layout.factor_kind).unbind(0)
    products = factors[row] * factors[col]
    mean, diagonal, *_ = products.unbind(0)
    neighbours = 2 * products[2:]
    return FlatOperators(layout, layout.level_onehot * mean[:, None], diagonal, neighbours, neighbours[2])


def flatten_levels(maps: list[Tensor]) -> Tensor:
    """(N, C, H_l, W_l) maps of one N and C -> (C, N * P) in the layout's cell order."""
    return torch.cat([m.flatten(2) for m in maps], dim=2).transpose(0, 1).flatten(1)


@dataclass
class FlatStatistics:
    """:class:`projection.TeacherStatistics` of L levels of N images, C channels, side by side.

    Attributes:
        cross: float32 (C, N * P), each level's ``U^T (w * t)`` in the layout's cell order.
        sums: float64 (2, L, C): ``sum(w * t)`` and ``sum(w * t^2)`` over the batch, per level and channel.
        valid_hw: int64 (L, N, 2): each image's valid (rows, columns) in teacher cells, per level.
        student_hw: each level's student frame (Hs, Ws).
        teacher_hw: each level's teacher frame (Ht, Wt).
    """

    cross: Tensor
    sums: Tensor
    valid_hw: Tensor
    student_hw: list[tuple[int, int]]
    teacher_hw: list[tuple[int, int]]


def flat_statistics(levels: list[TeacherStatistics]) -> FlatStatistics:
    """Per-level statistics of one N and C -> :class:`FlatStatistics`."""
    sums = torch.stack([t.sum for t in levels] + [t.sum_sq for t in levels]).sum(dim=1, dtype=torch.float64)
    return FlatStatistics(flatten_levels([t.cross for t in levels]).float(), sums.unflatten(0, (2, len(levels))),
                          torch.stack([t.valid_hw for t in levels]), [tuple(t.cross.shape[-2:]) for t in levels],
                          [t.teacher_hw for t in levels])
