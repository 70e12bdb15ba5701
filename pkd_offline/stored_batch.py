"""A batch's stored teacher levels on the training device, batched: per level and codec part one stack on the
host and one non-blocking copy, then one decode for the whole level (not one per sample).

The per-sample work (stacking maps of different sizes) runs on the host, on tensors the loader already holds
there; on CUDA the stacks are page-locked before they are copied, so no copy waits for the device.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from pkd_offline.device_codecs import DEVICE_CODECS, EncodedMap


def to_device(host: Tensor, device: torch.device | str | None) -> Tensor:
    """``host`` (a CPU tensor) on ``device`` without the host waiting: page-locked first where ``device`` is CUDA
    (a copy from pageable memory waits for the device's queued work)."""
    device = torch.device(device or "cpu")
    if host.device.type != "cpu":
        return host.to(device)
    if device.type == "cuda" and not host.is_pinned():
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def pad_stack(tensors: list[Tensor], size: tuple[int, ...] | None = None) -> Tensor:
    """Stack tensors of one dtype, ndim and device, zero-padded at the end of each dim to the largest (or to
    ``size``, the trailing dims; a tensor larger than ``size`` is cropped): (N, *size)."""
    largest = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
    if all(tuple(t.shape) == tuple(largest) for t in tensors):
        stacked = torch.stack(tensors)
    else:
        with warnings.catch_warnings():  # the strided nested layout is a prototype; its padding is stable
            warnings.simplefilter("ignore", UserWarning)
            # the aten op itself: ``torch.nested.nested_tensor`` adds a detach per tensor
            nested = torch._nested_tensor_from_tensor_list(tensors)
        stacked = torch.nested.to_padded_tensor(nested, 0, (len(tensors), *largest))
    return stacked if size is None else fit_trailing(stacked, size)


def fit_trailing(tensor: Tensor, size: tuple[int, ...]) -> Tensor:
    """``tensor`` with its last ``len(size)`` dims cropped or zero-padded at their end to ``size``."""
    current = tensor.shape[-len(size):]
    if tuple(current) == tuple(size):
        return tensor
    if any(n > s for s, n in zip(size, current)):
        tensor = tensor[(..., *(slice(0, s) for s in size))]
    grow = [p for s, n in zip(reversed(size), reversed(current)) for p in (0, max(0, s - n))]
    return torch.nn.functional.pad(tensor, grow) if any(grow) else tensor


def decode_stacked(codec: str, parts: dict[str, Tensor], basis) -> Tensor:
    """One decode of a level's parts stacked over N samples ({name: (N, C, H, W) map part, (N, C) channel part})
    with the codec's per-map decoder -> float32 (N, C, H, W).

    A codec with channel parts decodes each (map, channel) plane on its own, so the N samples fold into the
    channel axis; one without them decodes each cell from its own codes and the level's basis, so they fold
    into the rows."""
    decode = DEVICE_CODECS[codec].decode
    first = next(iter(parts.values()))
    n, channels = first.shape[:2]
    if any(values.dim() == 2 for values in parts.values()):
        planes = {name: values.flatten(0, 1) for name, values in parts.items()}
        return decode(planes, basis).unflatten(0, (n, channels))
    height, width = first.shape[-2:]
    rows = {name: values.transpose(0, 1).reshape(channels, n * height, width) for name, values in parts.items()}
    return decode(rows, basis).reshape(channels, n, height, width).transpose(0, 1)


def stored_levels(per_sample: dict[int, list], device: torch.device | str | None) -> dict[int, Tensor]:
    """{stride: float32 (N, C, H, W)} on ``device`` from each sample's stored level (a (C, h_i, w_i) tensor or an
    ``EncodedMap``), H, W the largest h_i, w_i. Past a sample's own map a dense level holds zeros and an encoded
    one what its codec decodes from zero codes (finite): callers weight those cells by zero."""
    levels = {}
    for stride, values in per_sample.items():
        if not isinstance(values[0], EncodedMap):
            levels[stride] = to_device(pad_stack(values), device).float()
            continue
        codec = values[0].codec
        parts = {name: to_device(pad_stack([value.parts[name] for value in values]), device)
                 for name in values[0].parts}
        levels[stride] = decode_stacked(codec, parts, values[0].basis)
    return levels
