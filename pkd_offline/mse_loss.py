"""Plain MSE feature imitation: the baseline the PKD paper compares the Pearson loss against (its RQ2).

For each paired level the student map ``s`` (N, C, Hs, Ws), bilinearly resized (``U``, align_corners=False) to the
teacher's frame, imitates the teacher map ``t`` with a mean squared error over the valid (unpadded) teacher cells
``w`` and every channel: ``sum(w * (U s - t)^2) / (C * sum(w))``. No adaptation layer: student and teacher have
the same channel count (the same ``--variant``).

It uses the teacher only through the same :class:`TeacherStatistics` as the PKD loss, so a projected store serves
it exactly: ``sum(w (U s - t)^2) = s^T (U^T W U) s - 2 <s, U^T (w t)> + sum(w t^2)``, with ``U^T W U`` applied by
:meth:`StudentOperators.quadratic` and ``U^T (w t)`` the statistics' ``cross``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pkd_offline.projection import TeacherStatistics, student_operators


def mse_from_statistics(student: Tensor, teacher: TeacherStatistics) -> Tensor:
    """The level's MSE (scalar float32) from the student map (N, C, Hs, Ws) and the teacher's statistics."""
    if student.shape != teacher.cross.shape:
        raise ValueError(f"student map {tuple(student.shape)} and teacher statistics {tuple(teacher.cross.shape)} "
                         "differ in batch, channels or size")
    with torch.autocast(student.device.type, enabled=False):  # the sums stay float32/float64 under AMP
        student = student.float()
        operators = student_operators(teacher.valid_hw, tuple(student.shape[-2:]), teacher.teacher_hw)
        count = teacher.valid_hw.prod(dim=1).sum().clamp_min(1) * student.shape[1]
        squared = (student * operators.quadratic(student)).sum() - 2 * (student * teacher.cross).sum()
        return ((squared + teacher.sum_sq.sum().float()) / count).clamp_min(0)
