"""A batch's stored teacher levels on the training device, batched: per level and codec part one stack on the
host and one non-blocking copy, then one decode for the whole level (not one per sample).

The per-sample work (stacking maps of different sizes) runs on the host, on tensors the loader already holds
there; on CUDA the stacks are page-locked before they are copied, so no copy waits for the device.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

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


def flat_concat(values: list[Tensor]) -> Tensor:
    """Tensors of one dtype and device, each flattened, end to end: one (sum of numels,) tensor, in one copy."""
    if len(values) == 1:
        return values[0].flatten()
    with warnings.catch_warnings():  # the strided nested layout is a prototype; its buffer is its tensors in order
        warnings.simplefilter("ignore", UserWarning)
        return torch._nested_tensor_from_tensor_list(values).values()


def stored_cells(values: list, device: torch.device | str | None) -> Tensor:
    """Stored maps (each a (C, h_i, w_i) tensor, or each an ``EncodedMap`` of one codec) decoded on ``device``, each
    flattened, end to end: float32 (sum C h_i w_i,). Per codec part one stack on the host and one copy, then one
    decode: a codec without a basis decodes all values as one (E,) map part, its channel parts gathered to one per
    value; one with a basis (pca: one per level) takes the steps of all values at once and applies each basis to
    its maps' values (``DeviceCodec.steps``, ``from_steps``)."""
    if not isinstance(values[0], EncodedMap):
        return to_device(flat_concat(values), device).float()
    if len({value.codec for value in values}) > 1:
        raise ValueError(f"stored maps of several codecs: {sorted({value.codec for value in values})}")
    if values[0].basis is None:
        return _decode_without_basis(values, device)
    runs: list[list[EncodedMap]] = []
    for value in values:
        if runs and _same_basis(value.basis, runs[-1][0].basis):
            runs[-1].append(value)
        else:
            runs.append([value])
    return _decode_by_steps(runs, device)


def _decode_by_steps(runs: list[list[EncodedMap]], device: torch.device | str | None) -> Tensor:
    """:func:`stored_cells` of a codec with a basis (``DeviceCodec.steps``): the steps of every value at once, then
    per run (basis) one ``from_steps`` on its (C, cells) steps, gathered there and back by one index each."""
    values = [value for run in runs for value in run]
    codec = DEVICE_CODECS[values[0].codec]
    parts = {name: to_device(flat_concat([value.parts[name] for value in values]), device) for name in values[0].parts}
    starts = np.cumsum([0] + [math.prod(value.shape) for value in values])
    order, block, sizes = [], 0, []  # order: buffer positions of each run's (channel, its maps' cells)
    for run in runs:
        blocks = [np.arange(starts[block + i], starts[block + i + 1]).reshape(value.shape[0], -1)
                  for i, value in enumerate(run)]
        order.append(np.concatenate(blocks, axis=1).ravel())
        sizes.append(order[-1].size)
        block += len(run)
    gather = np.concatenate(order)
    index = to_device(torch.from_numpy(np.stack([gather, np.argsort(gather)])), device)
    by_channel = codec.steps(parts).index_select(0, index[0]).split(sizes)
    decoded = [codec.from_steps(steps.view(run[0].shape[0], -1), run[0].basis).flatten()
               for run, steps in zip(runs, by_channel)]
    return (decoded[0] if len(decoded) == 1 else torch.cat(decoded)).index_select(0, index[1])


def _same_basis(basis, other) -> bool:
    """True for one basis: the same object, or two read from the same store side file (one ``key``)."""
    return basis is other or (basis is not None and other is not None and bool(basis.key) and basis.key == other.key)


def _decode_without_basis(values: list[EncodedMap], device: torch.device | str | None) -> Tensor:
    """:func:`stored_cells` of maps of a codec without a basis."""
    first = values[0]
    names = [name for name, part in first.parts.items() if part.dim() == 1]
    parts = {name: to_device(flat_concat([value.parts[name] for value in values]), device)
             for name in first.parts if name not in names}
    if names:  # (parts, maps * C) gathered to each value's (map, channel)
        repeats = np.repeat([value.shape[-2] * value.shape[-1] for value in values], first.shape[0])
        index = to_device(torch.from_numpy(np.repeat(np.arange(len(repeats)), repeats)), device)
        host = torch.stack([value.parts[name] for name in names for value in values])
        gathered = to_device(host, device).reshape(len(names), -1).index_select(1, index)
        parts.update(zip(names, gathered.unbind(0)))
    return DEVICE_CODECS[first.codec].decode(parts, first.basis)
