"""The pca codec's basis, fitted once per store on the stored maps of its first batches."""

from __future__ import annotations

from typing import Callable, Iterable

from pkd_offline.extraction.encode import raise_if_not_finite
from pkd_offline.extraction.teacher_maps import TeacherMaps
from storage.pca_basis import basis_from_moments, level_steps, side_bytes

Forward = Callable[[list[dict]], TeacherMaps]  # one same-size batch -> its maps (``teacher_levels``, bound)


def fit_side(forward: Forward, batches: Iterable[list[dict]], strides: list[int],
             step: float) -> tuple[bytes, list[tuple[list[dict], TeacherMaps]]]:
    """The pca codec's side file, per stride a basis fitted on the stored maps (projections for the projected
    strides) that ``forward`` gives for ``batches`` (the store's first ``FIT_SAMPLES`` samples in shard order,
    ``ShardPlan.fit_batches``), ``step`` the rounding step at the finest level (channel std units); and those
    batches with their maps, which the caller encodes rather than running them again. PkdError naming the image if
    any fitted value is NaN or Inf."""
    fitted, moments = [], {}  # stride -> [positions, (C,) sums, (C, C) sums of products], float64 on the device
    for batch in batches:
        maps = forward(batch)
        fitted.append((batch, maps))
        for stride in strides:
            for _, values in maps.levels[stride]:
                flat = values.double().transpose(0, 1).flatten(1)  # (C, n * h * w)
                count, total, gram = moments.get(stride, (0, 0.0, 0.0))
                moments[stride] = (count + flat.shape[1], total + flat.sum(dim=1), gram + flat @ flat.T)
    for batch, maps in fitted:
        raise_if_not_finite(batch, maps.finite.cpu(), strides)
    steps = level_steps(step, strides)
    return side_bytes({stride: basis_from_moments(count, total.cpu().numpy(), gram.cpu().numpy(), steps[stride])
                       for stride, (count, total, gram) in moments.items()}), fitted
