import numpy as np
import pytest
import torch

from pkd_offline.loss import pcc_loss, pkd_loss


def reference_one_minus_r(student: np.ndarray, teacher: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Independent float64 computation: 1 - Pearson r per channel over valid (N, H, W), averaged."""
    n, c = student.shape[:2]
    mask = np.ones((n,) + student.shape[2:], bool) if valid is None else valid
    values = []
    for channel in range(c):
        s = student[:, channel][mask].astype(np.float64)
        t = teacher[:, channel][mask].astype(np.float64)
        values.append(1.0 - np.corrcoef(s, t)[0, 1])
    return float(np.mean(values))


def test_matches_one_minus_pearson_r():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 5, 6, 7, generator=generator)
    student = 0.7 * teacher + torch.randn(2, 5, 6, 7, generator=generator)
    expected = reference_one_minus_r(student.numpy(), teacher.numpy())
    assert pcc_loss(student, teacher).item() == pytest.approx(expected, abs=1e-4)


def test_identical_maps_give_zero_and_opposite_give_two():
    generator = torch.Generator().manual_seed(10)
    teacher = torch.randn(3, 4, 5, 5, generator=generator)
    assert pcc_loss(teacher.clone(), teacher).item() == pytest.approx(0.0, abs=1e-5)
    assert pcc_loss(-teacher, teacher).item() == pytest.approx(2.0, abs=1e-4)


def test_invariant_to_positive_scale_and_shift_of_teacher_per_channel():
    generator = torch.Generator().manual_seed(11)
    teacher = torch.randn(2, 4, 8, 8, generator=generator)
    student = torch.randn(2, 4, 8, 8, generator=generator)
    scale = torch.tensor([0.1, 3.0, 50.0, 1e-2]).view(1, 4, 1, 1)
    shift = torch.tensor([-5.0, 0.0, 100.0, 2.0]).view(1, 4, 1, 1)
    assert pcc_loss(student, teacher * scale + shift).item() == pytest.approx(pcc_loss(student, teacher).item(), abs=1e-4)


def test_padding_does_not_change_loss_with_valid_mask():
    generator = torch.Generator().manual_seed(1)
    teacher = torch.randn(2, 3, 6, 5, generator=generator)
    student = teacher + 0.5 * torch.randn(2, 3, 6, 5, generator=generator)
    unpadded = pcc_loss(student, teacher)
    padded_t = torch.nn.functional.pad(teacher, (0, 3, 0, 2), value=7.0)
    padded_s = torch.nn.functional.pad(student, (0, 3, 0, 2), value=-3.0)
    valid = torch.zeros(2, 8, 8, dtype=torch.bool)
    valid[:, :6, :5] = True
    assert pcc_loss(padded_s, padded_t, valid).item() == pytest.approx(unpadded.item(), abs=1e-5)
    assert pcc_loss(padded_s, padded_t).item() != pytest.approx(unpadded.item(), abs=1e-3)


def test_ragged_valid_regions_match_reference():
    generator = torch.Generator().manual_seed(2)
    teacher = torch.randn(2, 3, 6, 6, generator=generator)
    student = teacher + torch.randn(2, 3, 6, 6, generator=generator)
    valid = torch.zeros(2, 6, 6, dtype=torch.bool)
    valid[0, :6, :4] = True
    valid[1, :3, :6] = True
    expected = reference_one_minus_r(student.numpy(), teacher.numpy(), valid.numpy())
    assert pcc_loss(student, teacher, valid).item() == pytest.approx(expected, abs=1e-4)


def test_student_resized_bilinearly_to_teacher_size():
    generator = torch.Generator().manual_seed(12)
    teacher = torch.randn(1, 2, 8, 8, generator=generator)
    student = torch.randn(1, 2, 4, 4, generator=generator)
    resized = torch.nn.functional.interpolate(student, size=(8, 8), mode="bilinear", align_corners=False)
    assert pcc_loss(student, teacher).item() == pytest.approx(pcc_loss(resized, teacher).item(), abs=1e-6)


def test_no_gradient_reaches_teacher_and_student_gets_one():
    generator = torch.Generator().manual_seed(13)
    teacher = torch.randn(1, 2, 4, 4, requires_grad=True, generator=generator)
    student = torch.randn(1, 2, 4, 4, requires_grad=True, generator=generator)
    pcc_loss(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_pkd_loss_sums_common_strides():
    generator = torch.Generator().manual_seed(14)
    teacher = {s: torch.randn(1, 2, 32 // s, 32 // s, generator=generator) for s in (8, 16, 32)}
    student = {s: torch.randn(1, 2, max(1, 32 // s), max(1, 32 // s), generator=generator) for s in (8, 16, 64)}
    expected = pcc_loss(student[8], teacher[8]) + pcc_loss(student[16], teacher[16])
    assert pkd_loss(student, teacher).item() == pytest.approx(expected.item(), abs=1e-6)


def test_channel_mismatch_is_an_error():
    generator = torch.Generator().manual_seed(15)
    with pytest.raises(ValueError, match="channels"):
        pcc_loss(torch.randn(1, 3, 4, 4, generator=generator), torch.randn(1, 4, 4, 4, generator=generator))


def test_levels_in_one_pass_match_an_independent_reference_in_value_and_gradient():
    """Three levels of one channel count (student maps half the teacher's, ragged valid regions): the one-pass
    loss and its gradient equal the definition computed level by level in float64 (resize, standardise over the
    valid cells, mse / 2)."""
    generator = torch.Generator().manual_seed(16)
    sizes = {4: (12, 10), 8: (6, 5), 16: (4, 3)}
    teacher = {s: torch.randn(3, 4, *hw, generator=generator) * (1 + s) + s for s, hw in sizes.items()}
    student = {s: (torch.randn(3, 4, (h + 1) // 2, (w + 1) // 2, generator=generator) - s).requires_grad_()
               for s, (h, w) in sizes.items()}
    valid = {}
    for s, (h, w) in sizes.items():
        valid[s] = torch.zeros(3, h, w, dtype=torch.bool)
        for n, (rows, cols) in enumerate([(h, w), (h - 1, w - 2), (h // 2, w)]):
            valid[s][n, :rows, :cols] = True
    loss = pkd_loss(student, teacher, valid)
    grads = torch.autograd.grad(loss, list(student.values()))
    reference = 0.0
    for s in sizes:
        resized = torch.nn.functional.interpolate(student[s].double(), size=sizes[s], mode="bilinear",
                                                  align_corners=False).transpose(0, 1)[:, valid[s]]
        values = teacher[s].double().transpose(0, 1)[:, valid[s]]
        standard = [(v - v.mean(dim=1, keepdim=True)) / (v.var(dim=1, unbiased=False, keepdim=True).sqrt() + 1e-6)
                    for v in (resized, values)]
        reference = reference + ((standard[0] - standard[1]) ** 2).mean() / 2
    expected = torch.autograd.grad(reference, list(student.values()))
    assert loss.item() == pytest.approx(reference.item(), abs=1e-5)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-7)


def test_levels_of_other_channel_counts_pass_apart():
    generator = torch.Generator().manual_seed(17)
    teacher = {8: torch.randn(2, 3, 8, 8, generator=generator), 16: torch.randn(2, 5, 4, 4, generator=generator),
               32: torch.randn(2, 3, 2, 2, generator=generator)}
    student = {s: torch.randn(*t.shape[:2], 32 // s, 32 // s, generator=generator) for s, t in teacher.items()}
    expected = sum(pcc_loss(student[s], teacher[s]).item() for s in teacher)
    assert pkd_loss(student, teacher).item() == pytest.approx(expected, abs=1e-6)
