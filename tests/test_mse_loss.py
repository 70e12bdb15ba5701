"""The MSE imitation loss (pkd_offline.mse_loss) against the map-based MSE written out in float64, from maps and from a
projected store's statistics, values and gradients, on ragged batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pkd_offline.mse_loss import mse_from_statistics
from pkd_offline.projection import project_image, projection_is_exact, statistics_from_maps, valid_rectangles
from pkd_offline.pyramid import level_size, projected_statistics

from test_projection import BATCHES, INDEX_PAIRS, batch_case


def reference_mse(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """sum over valid teacher cells and channels of (U s - t)^2, over their count, in float64."""
    resized = F.interpolate(student.double(), size=teacher.shape[-2:], mode="bilinear", align_corners=False)
    weight = valid.double().unsqueeze(1)
    return ((resized - teacher.double()).square() * weight).sum() / (weight.sum() * teacher.shape[1])


def value_and_grad(student, statistics):
    student.grad = None
    loss = mse_from_statistics(student, statistics)
    loss.backward()
    return loss.item(), student.grad.clone()


@pytest.mark.parametrize("pair", INDEX_PAIRS[:3], ids=lambda p: f"S{p[0]}-T{p[1]}")
@pytest.mark.parametrize("images", BATCHES, ids=["fills-frame", "odd-p5", "coco-size"])
def test_mse_from_maps_and_from_a_projected_store_equals_the_float64_map_mse(images, pair):
    student_stride, teacher_stride = pair
    own, maps, valid, frame, student = batch_case(images, student_stride, teacher_stride, seed=sum(pair))
    reference = reference_mse(student, maps, valid)
    reference.backward()
    expected_grad, scale = student.grad.clone(), student.grad.abs().max()
    assert reference.item() > 0.1
    from_maps = statistics_from_maps(maps, valid_rectangles(valid), tuple(student.shape[-2:]))
    value, grad = value_and_grad(student, from_maps)
    assert value == pytest.approx(reference.item(), rel=1e-5)
    assert (grad - expected_grad).abs().max() <= 1e-5 * scale
    assert projection_is_exact(student_stride, teacher_stride, 32)
    stored = [project_image(m, level_size(hw, teacher_stride)) for m, hw in zip(own, images)]
    value, grad = value_and_grad(student, projected_statistics(stored, images, frame, teacher_stride,
                                                               tuple(student.shape[-2:])))
    assert value == pytest.approx(reference.item(), rel=1e-5)
    assert (grad - expected_grad).abs().max() <= 1e-5 * scale
