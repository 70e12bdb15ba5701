"""The PKD path's fixed cost per step: its operators do not grow with the batch, and it never makes the host wait
for the device (no value read back) before the loss is read. Measured on the paper's pair made small
(``benchmarks.pkd_ops``: projected layout, the recipe's codec, maps kept encoded as CUDA training keeps them)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.pkd_ops import (SIZE_DIVISOR, STUDENT_STRIDES, operator_counts, pkd_step, small_store,
                                stored_batch, step_events)
from pkd_offline.device_codecs import EncodedMap, dense_map
from pkd_offline.engine import (Distillation, batch_padded_hw, distillation_loss, stored_statistics, teacher_maps,
                                valid_masks)
from pkd_offline.loss import pkd_loss
from pkd_offline.levels import pair_levels
from pkd_offline.pyramid import level_size

OPERATOR_BUDGET = 240  # top-level operators of one step (forward and backward), any batch size

# Operators that bring a value to the host: each waits for the device's queued work.
HOST_READS = {"aten::item", "aten::_local_scalar_dense", "aten::equal", "aten::is_nonzero", "aten::allclose"}


@pytest.fixture(scope="module")
def paper_store(tmp_path_factory):
    return small_store(tmp_path_factory.mktemp("pkd_ops"))


def test_operators_per_step_do_not_grow_with_the_batch(paper_store):
    counts = {size: operator_counts(step_events(*paper_store, size)) for size in (2, 8)}
    (top_2, calls_2), (top_8, calls_8) = counts[2], counts[8]
    assert top_2 == top_8, f"top-level operators: batch 2 {top_2}, batch 8 {top_8} (aten calls {calls_2}, {calls_8})"
    assert top_2 <= OPERATOR_BUDGET, f"{top_2} top-level operators per step"


class _Dispatched(TorchDispatchMode):
    """Records the name of every operator dispatched under it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(f"aten::{func.__name__.split('.')[0]}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("size", [2, 3])
def test_the_step_reads_nothing_back_from_the_device(paper_store, size):
    step = pkd_step(*paper_store, size)
    with _Dispatched() as dispatched:
        step()
    assert len(dispatched.names) > 100, "the step ran under the mode"
    assert not HOST_READS & set(dispatched.names), sorted(HOST_READS & set(dispatched.names))


def test_the_loss_is_the_same_from_encoded_and_decoded_samples(paper_store):
    """Encoded samples of different sizes decode as one padded level; what lies past each sample's own map must
    not reach the loss (pca decodes zero codes to the basis's mean, not to zero)."""
    encoded = stored_batch(*paper_store, 4)
    assert len({item["image_hw"] for item in encoded}) > 1, "a ragged batch"
    assert all(isinstance(level, EncodedMap) for item in encoded for level in item["teacher_features"].values())
    decoded = [{**item, "teacher_features": {t: dense_map(level) for t, level in item["teacher_features"].items()}}
               for item in encoded]
    pairs = pair_levels(STUDENT_STRIDES, sorted(encoded[0]["teacher_features"]), "index")
    frame = batch_padded_hw(encoded, SIZE_DIVISOR)
    generator = torch.Generator().manual_seed(0)
    student = {s: torch.randn(4, 64, *level_size(frame, s), generator=generator) for s, _ in pairs}
    images = [item["image"] for item in encoded]
    losses = [distillation_loss(student, batch, images, Distillation(pairs, 1.0), SIZE_DIVISOR, torch.device("cpu"))
              for batch in (encoded, decoded)]
    assert losses[0].item() == pytest.approx(losses[1].item(), abs=1e-6)


def test_the_levels_in_one_pass_give_the_per_level_loss_and_gradient(paper_store):
    """The step's teacher side for all levels at once (stored projections decoded together and placed, folded, by
    one scatter; the map level beside them) gives the loss and gradient of each level's own statistics."""
    batch = stored_batch(*paper_store, 3)
    assert len({item["image_hw"] for item in batch}) > 1, "a ragged batch"
    pairs = pair_levels(STUDENT_STRIDES, sorted(batch[0]["teacher_features"]), "index")
    frame = batch_padded_hw(batch, SIZE_DIVISOR)
    generator = torch.Generator().manual_seed(1)
    student = {s: torch.randn(3, 64, *level_size(frame, s), generator=generator).requires_grad_() for s, _ in pairs}
    images, device, distill = [item["image"] for item in batch], torch.device("cpu"), Distillation(pairs, 1.0)
    loss = distillation_loss(student, batch, images, distill, SIZE_DIVISOR, device)
    projected = [t for _, t in pairs if t in batch[0]["teacher_sums"]]
    assert projected and len(projected) < len(pairs), "projected levels and a map level"
    teacher = dict(teacher_maps(batch, images, distill, frame, device, skip=frozenset(projected)))
    valid = valid_masks([item["image_hw"] for item in batch], frame, list(teacher), device)
    teacher.update(stored_statistics(batch, projected, frame, {t: tuple(student[s].shape[-2:]) for s, t in pairs
                                                                if t in projected}, device))
    per_level = [pkd_loss({t: student[s]}, {t: teacher[t]}, valid) for s, t in pairs]
    assert loss.item() == pytest.approx(sum(level.item() for level in per_level), abs=1e-5)
    for got, want in zip(torch.autograd.grad(loss, list(student.values())),
                         torch.autograd.grad(sum(per_level), list(student.values()))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-8)
