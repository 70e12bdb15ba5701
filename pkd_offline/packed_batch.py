"""A batch that crosses from a DataLoader worker to the main process as one tensor per dtype.

A worker hands each tensor of a batch to the main process separately: with PyTorch's default
``file_descriptor`` sharing, every tensor is one shared-memory segment, one descriptor sent over a
socket and one ``mmap`` in the main process, and a stored sample adds a tensor per level (and per codec
part and sum). Packed, the batch is one segment per dtype, written where the worker is, and the main
process gets views into it: its receiving cost does not grow with the number of tensors.

``pack_batch(items)`` (in a worker) gives a :class:`PackedBatch`; pickling it carries only the flat
tensors and the batch's structure, and unpickling gives back a plain ``list`` of the same items,
every tensor a view of its dtype's flat tensor (same shape, dtype and values; contiguous, so a
channels-last layout is not kept, and a tensor that appears twice comes back as two). Containers
walked: dict, list, tuple (named tuples too) and dataclass instances (e.g. ``EncodedMap``; rebuilt
without calling ``__init__``). Anything else travels as it is, and so does a tensor that packing would
change: a subclass (e.g. torchvision's tv_tensors), one that requires grad, a quantized or sparse one.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where one tensor sits in the packed batch: its dtype's flat tensor, the offset (elements), the shape."""

    dtype: torch.dtype
    offset: int
    shape: tuple[int, ...]


class PackedBatch:
    """``flat`` {dtype: 1-D Tensor} plus ``skeleton``: the batch with each tensor replaced by a :class:`_Slot`.

    Pickled (the DataLoader's result queue), it rebuilds as a plain list of items in the receiving process.
    """

    def __init__(self, flat: dict[torch.dtype, Tensor], skeleton: list) -> None:
        self.flat, self.skeleton = flat, skeleton

    def __reduce__(self):
        return unpack_batch, (self.flat, self.skeleton)


def pack_batch(items: list, *, shared: bool = True) -> PackedBatch:
    """Copy every tensor of ``items`` into one flat tensor per dtype (in shared memory with ``shared``,
    as the DataLoader's own collate does in a worker, so sending it moves no bytes)."""
    groups: dict[torch.dtype, list[Tensor]] = {}
    sizes: dict[torch.dtype, int] = {}

    def slot(tensor: Tensor) -> _Slot:
        offset = sizes.get(tensor.dtype, 0)
        groups.setdefault(tensor.dtype, []).append(tensor.reshape(-1))
        sizes[tensor.dtype] = offset + tensor.numel()
        return _Slot(tensor.dtype, offset, tuple(tensor.shape))

    skeleton = _replace_tensors(list(items), slot)
    flat = {}
    for dtype, parts in groups.items():
        if shared:  # allocated in shared memory at once (as the DataLoader's default collate does), not copied there
            out = parts[0].new(parts[0]._typed_storage()._new_shared(sizes[dtype], device="cpu"))
        else:
            out = torch.empty(sizes[dtype], dtype=dtype)
        flat[dtype] = torch.cat(parts, out=out)
    return PackedBatch(flat, skeleton)


def _packable(tensor: Tensor) -> bool:
    """Whether a view of a flat tensor can stand for ``tensor``: a plain, strided, non-quantized CPU tensor
    that does not require grad."""
    return (type(tensor) is Tensor and tensor.layout == torch.strided and not tensor.is_quantized
            and not tensor.requires_grad and tensor.device.type == "cpu")


def unpack_batch(flat: dict[torch.dtype, Tensor], skeleton: list) -> list:
    """The items ``pack_batch`` packed, each tensor a view of ``flat[dtype]``."""
    def tensor(where: _Slot) -> Tensor:
        return flat[where.dtype][where.offset:where.offset + math.prod(where.shape)].view(where.shape)

    return _replace_slots(skeleton, tensor)


def _replace_tensors(value: Any, slot) -> Any:
    if isinstance(value, Tensor):
        return slot(value) if _packable(value) else value
    return _rebuild(value, lambda inner: _replace_tensors(inner, slot))


def _replace_slots(value: Any, tensor) -> Any:
    if isinstance(value, _Slot):
        return tensor(value)
    return _rebuild(value, lambda inner: _replace_slots(inner, tensor))


def _rebuild(value: Any, convert) -> Any:
    """``value`` with ``convert`` applied to what it holds: a dict, list, tuple or dataclass instance comes back
    as a new one of its type where anything inside changed, as itself where nothing did (e.g. a pca basis of
    numpy arrays, shared by every sample, stays one object); anything else, dict and list subclasses included
    (a defaultdict's factory would be lost), as itself."""
    if type(value) is dict:
        converted = {key: convert(inner) for key, inner in value.items()}
        return value if all(converted[key] is inner for key, inner in value.items()) else converted
    if type(value) is list or isinstance(value, tuple):
        converted = [convert(inner) for inner in value]
        if all(a is b for a, b in zip(converted, value)):
            return value
        if type(value) is list or type(value) is tuple:
            return type(value)(converted)
        return type(value)(*converted) if hasattr(value, "_fields") else type(value)(converted)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [f.name for f in dataclasses.fields(value)]
        converted = {name: convert(getattr(value, name)) for name in fields}
        if all(converted[name] is getattr(value, name) for name in fields):
            return value
        rebuilt = copy.copy(value)  # no __init__ / __post_init__: they would see placeholders
        for name, inner in converted.items():
            object.__setattr__(rebuilt, name, inner)  # frozen dataclasses too
        return rebuilt
    return value
