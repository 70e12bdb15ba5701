"""The PKD loss: feature imitation with the Pearson correlation coefficient (Cao et al., NeurIPS 2022).

For each pyramid level both maps are normalised per channel to zero mean and unit variance over
the batch and space (N, H, W), then ``mse(norm_s, norm_t) / 2`` is taken. With the population
variance used here this equals ``1 - r`` averaged over channels, r being the Pearson correlation
between student and teacher activations of that channel.

Offline stores hold images padded to a common batch size, so statistics and the mean are taken
over the *valid* (unpadded) positions only: padding a batch does not change the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-6


def _standardise(x: Tensor, weight: Tensor, count: Tensor) -> Tensor:
    """Per-channel zero mean, unit variance over weighted (N, H, W); x (N, C, H, W), weight (N, 1, H, W)."""
    mean = (x * weight).sum(dim=(0, 2, 3), keepdim=True) / count
    centred = x - mean
    var = (centred.square() * weight).sum(dim=(0, 2, 3), keepdim=True) / count
    # eps on the std as in the official implementation; the tiny term under the root keeps the
    # gradient finite for constant channels.
    return centred / (torch.sqrt(var + 1e-12) + EPS)


def pcc_loss(student: Tensor, teacher: Tensor, valid: Tensor | None = None) -> Tensor:
    """PKD loss for one level: ``1 - r`` averaged over channels, as a scalar float32 tensor.

    Args:
        student: (N, C, Hs, Ws) student FPN map; bilinearly resized to the teacher's (H, W) if they differ.
        teacher: (N, C, H, W) teacher FPN map; no gradient flows into it.
        valid: optional bool (N, H, W) mask of unpadded positions at the teacher's size; statistics
            and the mean are taken over these positions only.
    """
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"student map {tuple(student.shape)} and teacher map {tuple(teacher.shape)} differ in batch or channels"
        )
    teacher = teacher.detach().float()
    student = student.float()
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
    if valid is None:
        weight = torch.ones_like(teacher[:, :1])
    else:
        if valid.shape != (teacher.shape[0], *teacher.shape[-2:]):
            raise ValueError(f"valid mask {tuple(valid.shape)} does not match teacher map {tuple(teacher.shape)}")
        weight = valid.to(teacher.dtype).unsqueeze(1)
    count = weight.sum().clamp_min(1.0)
    norm_s = _standardise(student, weight, count)
    norm_t = _standardise(teacher, weight, count)
    squared_error = (norm_s - norm_t).square() * weight
    return squared_error.sum() / (count * teacher.shape[1]) / 2


def pkd_loss(
    student: dict[int, Tensor],
    teacher: dict[int, Tensor],
    valid: dict[int, Tensor] | None = None,
) -> Tensor:
    """Sum of :func:`pcc_loss` over the strides present in both pyramids (keys are strides in pixels).

    ``valid`` maps a stride to the bool (N, H, W) mask at the teacher's size for that stride.
    Pair levels of different strides by re-keying the student dict first (see ``levels.pair_levels``).
    """
    strides = sorted(set(student) & set(teacher))
    if not strides:
        raise ValueError(f"no common strides: student {sorted(student)}, teacher {sorted(teacher)}")
    losses = [pcc_loss(student[s], teacher[s], None if valid is None else valid[s]) for s in strides]
    return torch.stack(losses).sum()
