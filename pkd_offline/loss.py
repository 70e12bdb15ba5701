"""The PKD loss: feature imitation with the Pearson correlation coefficient (Cao et al., NeurIPS 2022).

For each pyramid level both maps are normalised per channel to zero mean and unit variance over
the batch and space (N, H, W), then ``mse(norm_s, norm_t) / 2`` is taken. With the population
variance used here this equals ``1 - r`` averaged over channels, r being the Pearson correlation
between student and teacher activations of that channel. As in the official implementation,
``EPS`` is added to each standard deviation.

Offline stores hold images padded to a common batch size, so statistics and the mean are taken
over the *valid* (unpadded) positions only: padding a batch does not change the loss.

One code path: teacher maps are first reduced to :class:`TeacherStatistics` (the cross map
``U^T (w * t)`` at the student's size and per-image sums), which is also what a projected store
holds; the loss is then formed from these and the student map at the student's own resolution.
Expanding the mse of the two standardised maps gives, per channel,
``0.5 * (var_s / (std_s + EPS)^2 + var_t / (std_t + EPS)^2) - cov / ((std_s + EPS) * (std_t + EPS))``
with ``std = sqrt(var + 1e-12)``: the same numbers as standardising, up to float rounding. The levels of one
batch and channel count are formed in one pass (:func:`pcc_over_levels`: the levels side by side,
``level_layout``), so the loss dispatches the same operators for any batch and number of levels.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from pkd_offline.level_layout import FlatStatistics, flat_layout, flat_operators, flat_statistics, flatten_levels
from pkd_offline.projection import TeacherStatistics, statistics_from_maps, valid_rectangles

EPS = 1e-6


def pcc_loss(student: Tensor, teacher: Tensor | TeacherStatistics, valid: Tensor | None = None) -> Tensor:
    """PKD loss for one level: ``1 - r`` averaged over channels, as a scalar float32 tensor.

    Args:
        student: (N, C, Hs, Ws) student FPN map; bilinearly resized (align_corners=False) to the
            teacher's (H, W) in the loss's definition (the computation itself stays at (Hs, Ws)).
        teacher: (N, C, H, W) teacher map (no gradient flows into it), or its statistics.
        valid: for a teacher map, optional bool (N, H, W) mask of unpadded positions at the teacher's
            size, one top-left rectangle per image; statistics and the mean are taken over these
            positions only. Statistics carry their own valid rectangles.
    """
    with torch.autocast(student.device.type, enabled=False):  # the sums stay float32/float64 under AMP
        return pcc_from_statistics(student, teacher_statistics(student, teacher, valid))


def teacher_statistics(student: Tensor, teacher: Tensor | TeacherStatistics,
                       valid: Tensor | None = None) -> TeacherStatistics:
    """The teacher's side of a level's loss at the student map's (N, C, Hs, Ws) size: statistics as given, or
    reduced from a teacher map (N, C, H, W) over its ``valid`` (N, H, W) rectangles (every cell without)."""
    if isinstance(teacher, TeacherStatistics):
        return teacher
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"student map {tuple(student.shape)} and teacher map {tuple(teacher.shape)} differ in "
                         "batch or channels")
    if valid is None:
        valid_hw = torch.tensor([list(teacher.shape[-2:])] * teacher.shape[0], device=teacher.device)
    else:
        if valid.shape != (teacher.shape[0], *teacher.shape[-2:]):
            raise ValueError(f"valid mask {tuple(valid.shape)} does not match teacher map {tuple(teacher.shape)}")
        valid_hw = valid_rectangles(valid)
    with torch.autocast(student.device.type, enabled=False):
        return statistics_from_maps(teacher, valid_hw, tuple(student.shape[-2:]))


def pcc_from_statistics(student: Tensor, teacher: TeacherStatistics) -> Tensor:
    """``1 - r`` averaged over channels from the student map (N, C, Hs, Ws) and the teacher's statistics."""
    return pcc_over_levels([student], [teacher])


def pcc_over_levels(students: list[Tensor], teachers: list[TeacherStatistics] | FlatStatistics) -> Tensor:
    """The sum over levels of :func:`pcc_from_statistics` (scalar float32), all levels in one pass: student maps
    (N, C, Hs_l, Ws_l) of one N and C and their teacher statistics, laid side by side (``level_layout``), so the
    number of operators depends neither on the number of levels nor on the batch."""
    flat = isinstance(teachers, FlatStatistics)
    expected = [(*students[0].shape[:2], *hw) for hw in teachers.student_hw] if flat else \
        [tuple(t.cross.shape) for t in teachers]
    for student, shape in zip(students, expected, strict=True):
        if tuple(student.shape) != shape:
            raise ValueError(f"student map {tuple(student.shape)} and teacher statistics {shape} differ in batch, "
                             "channels or size")
    with torch.autocast(students[0].device.type, enabled=False):  # the sums stay float32/float64 under AMP
        teacher = teachers if flat else flat_statistics(teachers)
        layout = flat_layout(students[0].shape[0], teacher.student_hw, teacher.teacher_hw, students[0].device)
        operators = flat_operators(layout, teacher.valid_hw)
        count = teacher.valid_hw.prod(dim=2).sum(dim=1).clamp_min(1).double()  # (L,) valid teacher cells
        count_float = count.float()
        student = flatten_levels(students)  # (C, N * P)
        student = student if student.dtype == torch.float32 else student.float()
        mean_s = student @ operators.mean_weight / count_float  # (C, L)
        centred = student - mean_s.index_select(1, layout.level_index)
        var_s = (operators.quadratic_density(centred) @ layout.level_onehot / count_float).clamp_min(0)
        mean_t, mean_sq_t = (teacher.sums / count[:, None]).transpose(1, 2).unbind(0)  # (C, L) each
        var_t = (mean_sq_t - mean_t.square()).clamp_min(0).float()
        # sum(w * U centred) is zero up to rounding; kept so the teacher's mean never enters the cross term.
        cross = (centred * teacher.cross) @ layout.level_onehot - mean_t.float() * (centred @ operators.mean_weight)
        cov = cross / count_float
        scale_s = torch.sqrt(var_s + 1e-12) + EPS
        scale_t = torch.sqrt(var_t + 1e-12) + EPS
        per_channel = 0.5 * (var_s / scale_s.square() + var_t / scale_t.square()) - cov / (scale_s * scale_t)
        return per_channel.mean(dim=0).sum()


def pkd_loss(
    student: dict[int, Tensor],
    teacher: dict[int, Tensor | TeacherStatistics],
    valid: dict[int, Tensor] | None = None,
    level_loss: Callable[[Tensor, TeacherStatistics], Tensor] | None = None,
) -> Tensor:
    """Sum of :func:`pcc_loss` over the strides present in both pyramids (keys are strides in pixels), the levels
    of one batch and channel count in one pass (:func:`pcc_over_levels`).

    ``level_loss(student_map, statistics)`` replaces the per-level PCC (``mse_loss.mse_from_statistics``: plain
    MSE imitation of the same pairs, the paper's comparison).

    ``teacher`` maps a stride to a map (N, C, H, W) or its :class:`TeacherStatistics`; ``valid`` maps a
    stride to the bool (N, H, W) mask at the teacher's size for that stride (maps only).
    Pair levels of different strides by re-keying the student dict first (see ``levels.pair_levels``).
    """
    strides = sorted(set(student) & set(teacher))
    if not strides:
        raise ValueError(f"no common strides: student {sorted(student)}, teacher {sorted(teacher)}")
    statistics = {s: teacher_statistics(student[s], teacher[s], None if valid is None else valid.get(s))
                  for s in strides}
    if level_loss is not None:
        return torch.stack([level_loss(student[s], statistics[s]) for s in strides]).sum()
    groups: dict[tuple[int, int], list[int]] = {}  # levels of one batch and channel count go in one pass
    for s in strides:
        groups.setdefault(tuple(student[s].shape[:2]), []).append(s)
    losses = [pcc_over_levels([student[s] for s in group], [statistics[s] for s in group])
              for group in groups.values()]
    return losses[0] if len(losses) == 1 else torch.stack(losses).sum()
