"""Teacher maps in a store's codec, on a torch device: encoded where the teacher runs, decoded where the
student trains.

Extraction encodes each level on the teacher's device (``ENCODERS``), so only the stored values cross
to the host (fp16: half of float32, int8: a quarter). Training on a GPU reads levels as the store holds
them (``StoreReader.keep_encoded``); DataLoader workers pass :class:`EncodedMap` on, and the device decodes
(``dense_map``). Each encoder and decoder is the torch twin of ``storage.codecs.CODECS[name]``: the same
values bit for bit (``tests/test_stored_maps.py`` holds every codec to it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from storage import CODECS
from storage.codecs import PcaCodec, EncodedLevel, map_part
from storage.pca_basis import LevelBasis


@dataclass
class EncodedMap:
    """One level of one sample as its codec stores it, as tensors: ``parts`` {name: Tensor} (a "map" part
    (C, H, W), a "channel" part (C,)), and the level's ``basis`` where the codec needs one (pca: a few hundred
    KB a level beside maps of many MB). ``decode(device)`` gives the float32 (C, H, W) map there."""

    codec: str
    parts: dict[str, Tensor]
    basis: LevelBasis | None = None

    @classmethod
    def from_level(cls, level: EncodedLevel) -> EncodedMap:
        return cls(level.codec, {name: torch.from_numpy(values) for name, values in level.parts.items()}, level.basis)

    @property
    def shape(self) -> torch.Size:
        """The decoded map's (C, H, W)."""
        return self.parts[map_part(self.codec)].shape

    def decode(self, device: torch.device | str | None = None) -> Tensor:
        parts = {name: values.to(device, non_blocking=True) for name, values in self.parts.items()}
        return DECODERS[self.codec](parts, self.basis)

    def pin_memory(self) -> EncodedMap:
        """A copy in page-locked memory (DataLoader ``pin_memory``), so the copy to the GPU runs asynchronously."""
        return EncodedMap(self.codec, {name: values.pin_memory() for name, values in self.parts.items()}, self.basis)


def dense_map(features: Tensor | EncodedMap, device: torch.device | str | None = None) -> Tensor:
    """A level's map as a tensor: an EncodedMap decoded on ``device`` (float32), a tensor as it is."""
    return features.decode(device) if isinstance(features, EncodedMap) else features


def _encode_float(dtype: torch.dtype) -> Callable[[Tensor], tuple[dict[str, Tensor], Tensor | None]]:
    limit = float(torch.finfo(dtype).max)

    def encode(features: Tensor, basis: LevelBasis | None = None) -> tuple[dict[str, Tensor], Tensor | None]:
        features = features.float()
        too_large = features.abs().amax() > limit if features.numel() else None
        return {"values": features.to(dtype)}, too_large
    return encode


def _encode_int(name: str) -> Callable[[Tensor], tuple[dict[str, Tensor], None]]:
    """``IntCodec.encode`` of codec ``name`` in torch, for maps (..., C, H, W): per map and channel, the range
    in float64, steps rounded half to even and clipped to +-levels (every finite value fits)."""
    levels = CODECS[name].levels

    def encode(features: Tensor, basis: LevelBasis | None = None) -> tuple[dict[str, Tensor], None]:
        return _encode_levels(features, levels), None
    return encode


def _encode_levels(features: Tensor, levels: int) -> dict[str, Tensor]:
    features = features.float()
    if features.shape[-1] * features.shape[-2] == 0:
        zeros = torch.zeros(features.shape[:-2], dtype=torch.float32, device=features.device)
        return {"q": torch.zeros(features.shape, dtype=torch.int8, device=features.device), "scale": zeros,
                "offset": zeros.clone()}
    flat = features.flatten(-2).double()
    low, high = flat.amin(dim=-1), flat.amax(dim=-1)
    scale = ((high - low) / (2 * levels)).float()
    offset = ((high + low) / 2).float()
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).double()[..., None, None]
    steps = (features.double() - offset.double()[..., None, None]) / divisor
    q = torch.clamp(torch.round(steps), -levels, levels).to(torch.int8)
    return {"q": q, "scale": scale, "offset": offset}


def _decode_float(parts: dict[str, Tensor], basis: LevelBasis | None = None) -> Tensor:
    return parts["values"].float()


def _decode_int(parts: dict[str, Tensor], basis: LevelBasis | None = None) -> Tensor:
    return parts["q"].float() * parts["scale"].float()[:, None, None] + parts["offset"].float()[:, None, None]


@dataclass
class DeviceBasis:
    """A LevelBasis's arrays as float64 tensors on one device (``device_basis``), so an extraction copies them
    there once, not once a batch."""

    mean: Tensor  # (C,)
    scale: Tensor  # (C,)
    components: Tensor  # (C, C)
    step: float


def device_basis(basis: LevelBasis | DeviceBasis, device: torch.device | str) -> DeviceBasis:
    """``basis`` as float64 tensors on ``device`` (a DeviceBasis already there is returned as it is)."""
    if isinstance(basis, DeviceBasis) and basis.mean.device == torch.device(device):
        return basis
    if isinstance(basis, DeviceBasis):
        return DeviceBasis(basis.mean.to(device), basis.scale.to(device), basis.components.to(device), basis.step)
    return DeviceBasis(*_basis_tensors(basis, torch.empty(0, device=device), torch.float64), basis.step)


_KEPT: dict[tuple[str, str, torch.dtype], tuple[Tensor, Tensor, Tensor]] = {}  # (key, device, dtype) -> tensors
KEPT_BASES = 64  # bases kept on devices at most (a store has one per level)


def _basis_tensors(basis: LevelBasis, like: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``basis``'s mean, scale (C,) and components (C, C) as ``dtype`` on ``like``'s device; a basis read from a
    store (``key``) is copied there once, not once a sample (a copy from pageable memory waits for the device)."""
    cache_key = (basis.key, str(like.device), dtype)
    if basis.key and cache_key in _KEPT:
        return _KEPT[cache_key]
    tensors = tuple(torch.from_numpy(np.asarray(v)).to(like.device, dtype)
                    for v in (basis.mean, basis.scale, basis.components))
    if basis.key:
        if len(_KEPT) >= KEPT_BASES:
            _KEPT.clear()
        _KEPT[cache_key] = tensors
    return tensors


def _encode_pca(features: Tensor, basis: LevelBasis | DeviceBasis | None) -> tuple[dict[str, Tensor], Tensor | None]:
    """``PcaCodec.encode`` in torch for maps (..., C, H, W), in float64 as numpy does: standardise, rotate
    (components^T), round half to even to the step, zigzag, two byte planes; and whether a code needs more than
    two bytes (a 0-dim bool tensor, None for empty maps)."""
    if basis is None:
        raise ValueError("the pca codec needs the store's basis")
    basis = device_basis(basis, features.device)
    standard = (features.double() - basis.mean[:, None, None]) / basis.scale[:, None, None]
    steps = torch.round(torch.einsum("cd,...chw->...dhw", basis.components, standard) / basis.step)
    codes = torch.where(steps >= 0, 2 * steps, -2 * steps - 1).long()
    too_far = codes.amax() > PcaCodec.max_code if codes.numel() else None
    return {"low": (codes & 0xFF).to(torch.uint8), "high": (codes >> 8).to(torch.uint8)}, too_far


def _decode_pca(parts: dict[str, Tensor], basis: LevelBasis | None) -> Tensor:
    """``PcaCodec.decode`` in torch on the parts' device, in float32 (within float32 rounding of numpy's float64)."""
    if basis is None:
        raise ValueError("the pca codec needs the store's basis")
    low = parts["low"]
    codes = low.long() + 256 * parts["high"].long()
    steps = (codes >> 1) ^ -(codes & 1)
    channels = low.shape[0]
    mean, scale, components = _basis_tensors(basis, low, torch.float32)
    standard = components @ (steps.reshape(channels, -1).float() * basis.step)
    return (standard * scale[:, None] + mean[:, None]).reshape(low.shape)


DEVICE_ENCODERS: dict[str, Callable[[Tensor], tuple[dict[str, Tensor], Tensor | None]]] = {
    "fp32": _encode_float(torch.float32),
    "fp16": _encode_float(torch.float16),
    **{name: _encode_int(name) for name in ("int8", "int6", "int4", "int2")},
    "pca": _encode_pca,
}
"""codec name -> encode(float (..., C, H, W) on any device, the level's basis or None) -> (parts as
``CODECS[name].encode`` makes them for each (C, H, W) map, a 0-dim bool tensor that is True where the codec
cannot hold the values, or None where it holds any). Nothing waits for the device: ``check_range`` reads the flag."""

RANGE_ERRORS = {
    "fp32": "features exceed the fp32 range: check the teacher",
    "fp16": f"features exceed the fp16 range (|x| > {float(torch.finfo(torch.float16).max):g}): use the fp32 codec",
    "pca": "features lie too far from the pca basis's mean (beyond +-32767 steps): the basis was fitted on other "
           "data; use the int8 codec",
}
"""codec name -> the ValueError message when its range flag is set."""


def check_range(codec: str, out_of_range: Tensor | bool | None) -> None:
    """ValueError (``RANGE_ERRORS[codec]``) if a device encoder's flag is set (reads it: waits for the device)."""
    if out_of_range is not None and bool(out_of_range):
        raise ValueError(RANGE_ERRORS[codec])


def _checked(codec: str) -> Callable[[Tensor], dict[str, Tensor]]:
    def encode(features: Tensor, basis: LevelBasis | DeviceBasis | None = None) -> dict[str, Tensor]:
        parts, out_of_range = DEVICE_ENCODERS[codec](features, basis)
        check_range(codec, out_of_range)
        return parts
    return encode


ENCODERS: dict[str, Callable[[Tensor], dict[str, Tensor]]] = {name: _checked(name) for name in DEVICE_ENCODERS}
"""codec name -> encode(float (..., C, H, W) on any device, the level's basis or None) -> parts as ``CODECS[name].encode`` makes them
for each (C, H, W) map; ValueError where the codec cannot hold the values."""

DECODERS: dict[str, Callable[[Tensor], dict[str, Tensor]]] = {
    "fp32": _decode_float,
    "fp16": _decode_float,
    **{name: _decode_int for name in ("int8", "int6", "int4", "int2")},
    "pca": _decode_pca,
}
"""codec name -> decode(parts on a device, the level's basis or None) -> float32 (C, H, W) there, as ``CODECS[name].decode``."""


def encode_on_device(codec: str, features: Tensor, basis: LevelBasis | None = None) -> list[EncodedLevel]:
    """Encode a batch of one level's maps (N, C, H, W) where they lie (with the level's ``basis`` for a codec
    that needs one) and bring the parts to the host: one EncodedLevel per map (numpy views of the batch's
    arrays). ValueError where the codec cannot hold the values (fp16 past its range, pca far off its basis)."""
    parts = {name: values.cpu().numpy() for name, values in ENCODERS[codec](features, basis).items()}
    return [EncodedLevel(codec, {name: values[i] for name, values in parts.items()}) for i in range(len(features))]
