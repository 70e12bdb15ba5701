"""A batch's teacher maps encoded where they lie and read back to the host as Samples.

``launch_encode`` queues the encoding and the copies without waiting for the device; ``finish`` waits for them
and checks what the device found (NaN or Inf, values past the codec's range)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pkd_offline.errors import PkdError
from pkd_offline.extraction.teacher_maps import TeacherMaps
from pkd_offline.device_codecs import DEVICE_CODECS, check_range
from storage import Sample
from storage.codecs import EncodedLevel


@dataclass
class LaunchedBatch:
    """A batch whose encoded levels are being copied to the host (``launch_encode``); ``finish`` waits for the
    copies (``done``, a CUDA event; None where the device is the host) and makes Samples of them."""

    batch: list[dict]
    strides: list[int]
    codec: str
    parts: dict[int, list[tuple[list[int], dict[str, Tensor]]]]  # stride -> [(positions, part -> (n, ...))], host
    statistics: dict[int, tuple[Tensor, Tensor]]  # projected stride -> (N, C) float64 sums, sums of squares
    finite: Tensor  # (levels, N) bool
    out_of_range: list[Tensor]  # 0-dim bool flags of the device encoders (on the host)
    done: torch.cuda.Event | None


def to_host(tensor: Tensor) -> Tensor:
    """A copy on the host that does not wait for the device (page-locked; valid once the batch's event is done)."""
    return tensor.to("cpu", non_blocking=True)


@torch.inference_mode()
def launch_encode(batch: list[dict], maps: TeacherMaps, strides: list[int], codec: str,
                  bases: dict | None = None) -> LaunchedBatch:
    """Encode ``maps`` with ``codec`` where they lie (``DEVICE_CODECS[codec].encode``; ``bases`` {stride: LevelBasis or
    DeviceBasis} for a codec that needs one) and start copying the stored values, the statistics and the checks to
    the host, without waiting for the device: only the encoded values cross (fp16: half of float32)."""
    parts, flags = {}, []
    for s in strides:
        parts[s] = []
        for indices, values in maps.levels[s]:
            encoded, out_of_range = DEVICE_CODECS[codec].encode(values, (bases or {}).get(s))
            parts[s].append((indices, {name: to_host(part) for name, part in encoded.items()}))
            if out_of_range is not None:
                flags.append(to_host(out_of_range))
    statistics = {s: (to_host(total), to_host(square)) for s, (total, square) in maps.statistics.items()}
    finite = to_host(maps.finite)
    device = maps.finite.device
    done = None
    if device.type == "cuda":
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(device))
    return LaunchedBatch(batch, strides, codec, parts, statistics, finite, flags, done)


def raise_if_not_finite(batch: list[dict], finite: Tensor, strides: list[int]) -> None:
    """PkdError naming the first image whose maps hold NaN or Inf (``finite``: (levels, N) bool on the host)."""
    for i, item in enumerate(batch):
        for j, s in enumerate(strides):
            if not finite[j, i]:
                raise PkdError(f"teacher features of image {item['image_id']} (view {item['view_index']}, stride "
                               f"{s}) hold NaN or Inf: nothing was written for it; check the checkpoint and the image")


def finish(launched: LaunchedBatch, n_views: int) -> list[Sample]:
    """Wait for ``launched``'s copies and make its Samples. PkdError naming the image if any value is NaN or Inf
    (nothing of the batch is written), or naming the batch's images if the codec cannot hold the values."""
    if launched.done is not None:
        launched.done.synchronize()
    batch, strides = launched.batch, launched.strides
    raise_if_not_finite(batch, launched.finite, strides)
    try:
        for flag in launched.out_of_range:
            check_range(launched.codec, flag)
    except ValueError as error:
        raise PkdError(f"images {[item['image_id'] for item in batch]}: {error}") from None
    features: list[dict[int, EncodedLevel]] = [{} for _ in batch]
    for s, groups in launched.parts.items():
        for indices, group in groups:
            group = {name: values.numpy() for name, values in group.items()}
            for k, i in enumerate(indices):
                features[i][s] = EncodedLevel(launched.codec, {name: values[k] for name, values in group.items()})
    statistics = {s: (total.numpy(), square.numpy()) for s, (total, square) in launched.statistics.items()}
    return [Sample(index=item["image_index"] * n_views + item["view_index"], image_id=item["image_id"],
                   view_index=item["view_index"], image_hw=tuple(item["image_hw"]), features=features[i],
                   extras=item.get("extras", {}),
                   statistics={s: {"sum": total[i], "sum_sq": square[i]} for s, (total, square) in statistics.items()})
            for i, item in enumerate(batch)]
