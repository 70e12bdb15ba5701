"""The PKD loss's view of a teacher map: statistics at the student's resolution.

With the student map ``s`` (N, C, Hs, Ws) bilinearly resized (``U``, align_corners=False) to the
teacher's frame (Ht, Wt) and the valid region ``w`` (one top-left rectangle per image), the
per-channel PKD loss needs the teacher map ``t`` only through

- ``cross = U^T (w * t)``: (N, C, Hs, Ws), at the student's resolution (``sum(w * Us * t) = sum(s * cross)``);
- ``sum = sum(w * t)`` and ``sum_sq = sum(w * t^2)`` per image and channel (float64);
- the valid rectangle per image (``valid_hw``, teacher cells) and the teacher frame (Ht, Wt).

The student's own statistics need ``U^T w`` and ``U^T W U``; as ``W`` is a rectangle per image and
``U`` separable, ``U^T W U`` is the Kronecker product of two tridiagonal matrices (bilinear weights
touch two adjacent source rows), applied here as shifts at the student's resolution.

A projected store keeps ``cross`` computed in a frame one student row and column larger than the
image's own (so no bilinear clamp touches it), which :func:`place_cross` folds back when an image
fills the batch frame. That is exact when the teacher frame is exactly twice the student frame in
every batch (the student stride divides the padding multiple), see :func:`projection_is_exact`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

RESIZE = "bilinear, align_corners=False"


@dataclass
class TeacherStatistics:
    """What the PKD loss uses of one level's teacher maps for a batch of N images, C channels.

    Attributes:
        cross: float32 (N, C, Hs, Ws), ``U^T (w * t)`` at the student's frame size.
        sum: float64 (N, C), ``sum(w * t)`` per image and channel.
        sum_sq: float64 (N, C), ``sum(w * t^2)``.
        valid_hw: int64 (N, 2), each image's valid (rows, columns) in teacher cells.
        teacher_hw: the teacher frame (Ht, Wt) that ``U`` resizes the student map to.
    """

    cross: Tensor
    sum: Tensor
    sum_sq: Tensor
    valid_hw: Tensor
    teacher_hw: tuple[int, int]


def projection_is_exact(student_stride: int, teacher_stride: int, size_divisor: int) -> bool:
    """True when every batch frame (a multiple of ``size_divisor`` px) has a teacher map exactly twice
    the student's, so a stored ``cross`` fits any batch (strides in px)."""
    return student_stride == 2 * teacher_stride and size_divisor % student_stride == 0


def interpolation_matrix(n_in: int, n_out: int, device: torch.device | None = None) -> Tensor:
    """(n_out, n_in) float32: the 1-D weights of the bilinear resize (align_corners=False), from F.interpolate."""
    identity = torch.eye(n_in, device=device).reshape(n_in, 1, n_in, 1)
    resized = F.interpolate(identity, size=(n_out, 1), mode="bilinear", align_corners=False)
    return resized[:, 0, :, 0].T.contiguous()


def resize_adjoint(values: Tensor, size: tuple[int, int]) -> Tensor:
    """``U^T values``: (N, C, Ht, Wt) -> (N, C, *size), U the bilinear resize (align_corners=False) from
    ``size`` to (Ht, Wt): the resize's own backward, so exact for any ratio; no gradient flows through it."""
    if tuple(values.shape[-2:]) == tuple(size):
        return values
    return torch.ops.aten.upsample_bilinear2d_backward(values.contiguous(), list(values.shape[-2:]),
                                                      [*values.shape[:2], *size], False, None, None)


def rectangle_masks(valid_hw: Tensor, frame_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Row and column masks, float32 (N, H) and (N, W), of each image's valid rectangle in a frame."""
    rows = torch.arange(frame_hw[0], device=valid_hw.device)[None] < valid_hw[:, :1]
    cols = torch.arange(frame_hw[1], device=valid_hw.device)[None] < valid_hw[:, 1:]
    return rows.float(), cols.float()


def valid_rectangles(valid: Tensor) -> Tensor:
    """int64 (N, 2) valid (rows, columns) of a bool (N, H, W) mask; ValueError unless each image's
    mask is one top-left rectangle (the region a padded batch leaves valid)."""
    rows = valid.any(dim=2).sum(dim=1)
    cols = valid.any(dim=1).sum(dim=1)
    hw = torch.stack([rows, cols], dim=1)
    rebuilt = rectangle_masks(hw, tuple(valid.shape[1:]))
    if not torch.equal(rebuilt[0][:, :, None] * rebuilt[1][:, None, :] > 0, valid):
        raise ValueError("valid mask must be one top-left rectangle per image (the unpadded region)")
    return hw


def statistics_from_maps(teacher: Tensor, valid_hw: Tensor, student_hw: tuple[int, int]) -> TeacherStatistics:
    """Reduce teacher maps (N, C, Ht, Wt) with valid rectangles (N, 2) to :class:`TeacherStatistics`."""
    teacher = teacher.detach().float()
    rows, cols = rectangle_masks(valid_hw, tuple(teacher.shape[-2:]))
    weight = rows[:, None, :, None] * cols[:, None, None, :]
    masked = teacher * weight
    return TeacherStatistics(cross=resize_adjoint(masked, student_hw), sum=masked.sum(dim=(2, 3), dtype=torch.float64),
                             sum_sq=masked.square().sum(dim=(2, 3), dtype=torch.float64), valid_hw=valid_hw,
                             teacher_hw=tuple(teacher.shape[-2:]))


def project_image(teacher: Tensor, valid_hw: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """One image's stored projection for a student of twice the teacher's stride.

    Args:
        teacher: (C, H, W) float32 map (H, W >= valid_hw, cells past valid_hw are ignored).
        valid_hw: the image's valid (ht, wt) teacher cells.
    Returns:
        ``cross`` (C, ceil(ht/2)+1, ceil(wt/2)+1) float32, computed in a teacher frame of twice that
        size (no clamp at its border touches it); ``sum`` and ``sum_sq`` (C,) float64.
    """
    cross, total, square = project_images(teacher[None], valid_hw)
    return cross[0], total[0], square[0]


def project_images(teacher: Tensor, valid_hw: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """``project_image`` of a batch of maps (N, C, H, W) that share one valid size: ``cross`` (N, C, hs, ws)
    float32, ``sum`` and ``sum_sq`` (N, C) float64, all on the maps' device (nothing waits for it)."""
    ht, wt = valid_hw
    hs, ws = math.ceil(ht / 2) + 1, math.ceil(wt / 2) + 1
    frame = teacher.new_zeros(teacher.shape[0], teacher.shape[1], 2 * hs, 2 * ws, dtype=torch.float32)
    frame[:, :, :ht, :wt] = teacher[:, :, :ht, :wt].float()
    wide = frame.double()
    return resize_adjoint(frame, (hs, ws)), wide.sum(dim=(2, 3)), (wide * wide).sum(dim=(2, 3))


def place_cross(per_image: list[Tensor], student_hw: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """Stack stored ``cross`` maps (C, h_i, w_i) into (N, C, Hs, Ws) for a batch frame at the student's size.

    A map one row (column) larger than the frame belongs to an image that fills the frame: the
    resize clamps at the frame's last row, so that row's weight folds into the last row in the frame.
    """
    height, width = student_hw
    out = torch.zeros(len(per_image), per_image[0].shape[0], height, width, device=device)
    for i, cross in enumerate(per_image):
        cross = cross.to(device=device, dtype=out.dtype)
        if cross.shape[1] > height + 1 or cross.shape[2] > width + 1:
            raise ValueError(f"stored projection {tuple(cross.shape)} exceeds the batch frame {student_hw} by more "
                             "than one")
        if cross.shape[1] > height:
            cross = torch.cat([cross[:, : height - 1], cross[:, height - 1:].sum(dim=1, keepdim=True)], dim=1)
        if cross.shape[2] > width:
            cross = torch.cat([cross[:, :, : width - 1], cross[:, :, width - 1:].sum(dim=2, keepdim=True)], dim=2)
        out[i, :, : cross.shape[1], : cross.shape[2]] = cross
    return out


def _tridiagonal(values: Tensor, diagonal: Tensor, upper: Tensor, dim: int) -> Tensor:
    """``T values`` along ``dim`` (-2 or -1) for symmetric tridiagonal T per image: diagonal (N, L), upper (N, L-1)."""
    shape = (values.shape[0], 1, -1, 1) if dim == -2 else (values.shape[0], 1, 1, -1)
    out = values * diagonal.reshape(shape)
    if values.shape[dim] > 1:
        length = values.shape[dim]
        upper = upper.reshape(shape)
        head, tail = values.narrow(dim, 0, length - 1), values.narrow(dim, 1, length - 1)
        out = out + F.pad(upper * tail, (0, 1) if dim == -1 else (0, 0, 0, 1))
        out = out + F.pad(upper * head, (1, 0) if dim == -1 else (0, 0, 1, 0))
    return out


@dataclass
class StudentOperators:
    """The student side of the loss at the student's resolution: ``mean_weight = U^T w`` (N, 1, Hs, Ws)
    and the tridiagonal factors of ``U^T W U`` per axis (diagonal (N, L), upper (N, L-1))."""

    mean_weight: Tensor
    rows: tuple[Tensor, Tensor]
    cols: tuple[Tensor, Tensor]

    def quadratic(self, values: Tensor) -> Tensor:
        """``U^T W U values`` for (N, C, Hs, Ws) values."""
        return _tridiagonal(_tridiagonal(values, *self.cols, dim=-1), *self.rows, dim=-2)


def student_operators(valid_hw: Tensor, student_hw: tuple[int, int], teacher_hw: tuple[int, int]) -> StudentOperators:
    """:class:`StudentOperators` for valid rectangles (N, 2) in a teacher frame, student frame ``student_hw``."""
    factors = []
    for axis in (0, 1):
        matrix = interpolation_matrix(student_hw[axis], teacher_hw[axis], valid_hw.device)  # (Lt, Ls)
        mask = (torch.arange(teacher_hw[axis], device=valid_hw.device)[None] < valid_hw[:, axis:axis + 1]).float()
        factors.append((mask @ matrix, mask @ matrix.square(), mask @ (matrix[:, :-1] * matrix[:, 1:])))
    (row_sum, row_diag, row_upper), (col_sum, col_diag, col_upper) = factors
    mean_weight = row_sum[:, None, :, None] * col_sum[:, None, None, :]
    return StudentOperators(mean_weight, (row_diag, row_upper), (col_diag, col_upper))
