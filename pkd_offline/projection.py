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
image's own (so no bilinear clamp touches it), which :func:`fold_cross` folds back when an image
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


def rectangle_masks(valid_hw: Tensor, frame_hw: tuple[int, int],
                    dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Row and column masks, ``dtype`` (N, H) and (N, W), of each image's valid rectangle in a frame."""
    rows = torch.arange(frame_hw[0], device=valid_hw.device) < valid_hw[:, :1]
    cols = torch.arange(frame_hw[1], device=valid_hw.device) < valid_hw[:, 1:]
    return rows.to(dtype), cols.to(dtype)


def valid_rectangles(valid: Tensor) -> Tensor:
    """int64 (N, 2) valid (rows, columns) of a bool (N, H, W) mask. Each image's mask must be one top-left
    rectangle (the region a padded batch leaves valid): checked on the mask's device without the host waiting
    for it (on a CPU a RuntimeError at once; on a GPU a device-side assertion)."""
    hw = torch.stack([valid.any(dim=2).sum(dim=1), valid.any(dim=1).sum(dim=1)], dim=1)
    rows, cols = rectangle_masks(hw, tuple(valid.shape[1:]), dtype=torch.bool)
    torch._assert_async((rows[:, :, None] & cols[:, None, :] == valid).all(),
                        "valid mask must be one top-left rectangle per image (the unpadded region)")
    return hw


def statistics_from_maps(teacher: Tensor, valid_hw: Tensor, student_hw: tuple[int, int],
                         valid: Tensor | None = None) -> TeacherStatistics:
    """Reduce teacher maps (N, C, Ht, Wt) with valid rectangles (N, 2) to :class:`TeacherStatistics`; ``valid``:
    the same rectangles as a bool (N, Ht, Wt) mask where the caller has one."""
    teacher = teacher.detach()
    teacher = teacher if teacher.dtype == torch.float32 else teacher.float()
    if valid is None:
        rows, cols = rectangle_masks(valid_hw, tuple(teacher.shape[-2:]))
        masked = teacher * (rows[:, None, :, None] * cols[:, None, None, :])
    else:
        masked = teacher * valid[:, None]
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


def fold_cross(cross: Tensor) -> Tensor:
    """Stored ``cross`` maps placed in a frame one row and column larger than the batch's (N, C, Hs+1, Ws+1),
    zero past each image's own, -> (N, C, Hs, Ws).

    A map one row (column) larger than the frame belongs to an image that fills the frame: the resize clamps
    at the frame's last row, so that row's weight folds into the last row in the frame (for the others the
    extra row is zero)."""
    rows = torch.cat([cross[:, :, :-2], cross[:, :, -2:].sum(dim=2, keepdim=True)], dim=2)
    return torch.cat([rows[..., :-2], rows[..., -2:].sum(dim=3, keepdim=True)], dim=3)


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


_AXIS_TABLES: dict[tuple[int, int, str], Tensor] = {}  # (student length, teacher length, device) -> table
KEPT_AXIS_TABLES = 256  # tables kept at most (one per frame size and level a run meets)


def axis_table(n_student: int, n_teacher: int, device: torch.device | None = None) -> Tensor:
    """(n_teacher + 1, 3, n_student) float32: row ``v`` holds, for an image valid on its first ``v`` teacher
    cells of this axis, ``m U``, ``m U**2`` and ``m (U[:, :-1] * U[:, 1:])`` (zero-padded by one), ``m`` that
    mask and ``U`` the (n_teacher, n_student) resize weights: prefix sums (float64), so an image's factors are
    one lookup. Built once per sizes and device."""
    key = (n_student, n_teacher, str(device))
    if key not in _AXIS_TABLES:
        matrix = interpolation_matrix(n_student, n_teacher, device).double()
        upper = F.pad(matrix[:, :-1] * matrix[:, 1:], (0, 1))
        terms = torch.stack([matrix, matrix.square(), upper], dim=1).cumsum(dim=0)
        if len(_AXIS_TABLES) >= KEPT_AXIS_TABLES:
            _AXIS_TABLES.clear()
        _AXIS_TABLES[key] = F.pad(terms, (0, 0, 0, 0, 1, 0)).float()
    return _AXIS_TABLES[key]


def student_operators(valid_hw: Tensor, student_hw: tuple[int, int], teacher_hw: tuple[int, int]) -> StudentOperators:
    """:class:`StudentOperators` for valid rectangles (N, 2) in a teacher frame, student frame ``student_hw``."""
    factors = []
    for axis in (0, 1):
        table = axis_table(student_hw[axis], teacher_hw[axis], valid_hw.device)
        total, diagonal, upper = table[valid_hw[:, axis]].unbind(dim=1)  # (N, Ls) each
        factors.append((total, diagonal, upper[:, :-1]))
    (row_sum, row_diag, row_upper), (col_sum, col_diag, col_upper) = factors
    mean_weight = row_sum[:, None, :, None] * col_sum[:, None, None, :]
    return StudentOperators(mean_weight, (row_diag, row_upper), (col_diag, col_upper))
