"""The storage codecs' torch twins: teacher maps encoded where the teacher runs, decoded where the student trains.

Each codec of ``storage.codecs.CODECS`` has one :class:`DeviceCodec` here, registered under the same name in
``DEVICE_CODECS``: its ``encode``, ``decode`` and ``range_error``, giving the same values as the numpy codec bit
for bit (pca: its decode works in float32 where numpy's works in float64; ``tests/test_device_codecs.py`` and
``tests/test_pca_codec.py`` hold every codec to it, ``tests/test_codec_registry.py`` that both halves exist).

Extraction encodes each level on the teacher's device (``DEVICE_CODECS[name].encode``), so only the stored
values cross to the host (fp16: half of float32, int8: a quarter). Training on a GPU reads levels as the store
holds them (``StoreReader.keep_encoded``); DataLoader workers pass :class:`EncodedMap` on, and the device decodes
(``dense_map``, or ``DEVICE_CODECS[name].decode(parts, basis)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from storage.codecs import CODECS, EncodedLevel, map_part
from storage.pca_basis import LevelBasis

Encoder = Callable[[Tensor, "LevelBasis | DeviceBasis | None"], tuple[dict[str, Tensor], Tensor | None]]
Decoder = Callable[[dict[str, Tensor], LevelBasis | None], Tensor]


@dataclass(frozen=True)
class DeviceCodec:
    """The torch twin of the storage codec ``name``.

    ``encode(features, basis)``: float (..., C, H, W) on any device and the level's basis (None for a codec
    without one) -> (parts as ``CODECS[name].encode`` makes them for each (C, H, W) map, on that device; a 0-dim
    bool tensor that is True where the codec cannot hold the values, or None where it holds any). Nothing waits
    for the device: :func:`check_range` reads the flag.

    ``decode(parts, basis)``: parts of one (C, H, W) map on a device -> float32 (C, H, W) there. A codec without
    a basis also decodes values of many maps end to end: a map part (E,) and channel parts (E,), one per value.

    ``range_error``: the message of the ValueError when the flag is set (None: the flag is never set).

    A codec with a basis decodes in two halves, so maps of several bases share the first: ``steps(parts)``, each
    value on its own (parts of any shape -> float32 of the map part's shape), and ``from_steps(steps, basis)``
    (float32 (C, M) -> float32 (C, M) values); ``decode`` is the two in turn.
    """

    name: str
    encode: Encoder
    decode: Decoder
    range_error: str | None = None
    steps: Callable[[dict[str, Tensor]], Tensor] | None = None
    from_steps: Callable[[Tensor, LevelBasis | None], Tensor] | None = None


DEVICE_CODECS: dict[str, DeviceCodec] = {}
"""codec name -> its :class:`DeviceCodec`, the same names as ``storage.codecs.CODECS``."""


def register_device_codec(codec: DeviceCodec) -> DeviceCodec:
    """Make ``codec`` the torch twin of the storage codec of its name; ValueError if storage has no codec of that
    name or it has a twin already."""
    problem = "has no storage codec" if codec.name not in CODECS else \
        "is registered twice" if codec.name in DEVICE_CODECS else None
    if problem:
        raise ValueError(f"device codec {codec.name!r} {problem}")
    DEVICE_CODECS[codec.name] = codec
    return codec


def check_range(codec: str, out_of_range: Tensor | bool | None) -> None:
    """ValueError (the codec's ``range_error``) if an encoder's flag is set (reads it: waits for the device)."""
    if out_of_range is not None and bool(out_of_range):
        raise ValueError(DEVICE_CODECS[codec].range_error)


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
        return DEVICE_CODECS[self.codec].decode(parts, self.basis)

    def pin_memory(self) -> EncodedMap:
        """A copy in page-locked memory (DataLoader ``pin_memory``), so the copy to the GPU runs asynchronously."""
        return EncodedMap(self.codec, {name: values.pin_memory() for name, values in self.parts.items()}, self.basis)


def dense_map(features: Tensor | EncodedMap, device: torch.device | str | None = None) -> Tensor:
    """A level's map as a tensor: an EncodedMap decoded on ``device`` (float32), a tensor as it is."""
    return features.decode(device) if isinstance(features, EncodedMap) else features


# --- fp32, fp16: a cast ---------------------------------------------------------------------------------------

def _float_encoder(dtype: torch.dtype) -> Encoder:
    limit = float(torch.finfo(dtype).max)

    def encode(features: Tensor, basis: LevelBasis | None = None) -> tuple[dict[str, Tensor], Tensor | None]:
        features = features.float()
        too_large = features.abs().amax() > limit if features.numel() else None
        return {"values": features.to(dtype)}, too_large
    return encode


def _decode_float(parts: dict[str, Tensor], basis: LevelBasis | None = None) -> Tensor:
    return parts["values"].float()


register_device_codec(DeviceCodec("fp32", _float_encoder(torch.float32), _decode_float,
                                  "features exceed the fp32 range: check the teacher"))
register_device_codec(DeviceCodec(
    "fp16", _float_encoder(torch.float16), _decode_float,
    f"features exceed the fp16 range (|x| > {float(torch.finfo(torch.float16).max):g}): use the fp32 codec"))


# --- int8, int6, int4, int2: affine quantisation per map and channel ------------------------------------------

def _int_encoder(levels: int) -> Encoder:
    """``IntCodec.encode`` with ``levels`` steps each side in torch, for maps (..., C, H, W): per map and channel,
    the range in float64, steps rounded half to even and clipped to +-levels (every finite value fits)."""

    def encode(features: Tensor, basis: LevelBasis | None = None) -> tuple[dict[str, Tensor], None]:
        features = features.float()
        if features.shape[-1] * features.shape[-2] == 0:
            zeros = torch.zeros(features.shape[:-2], dtype=torch.float32, device=features.device)
            return {"q": torch.zeros(features.shape, dtype=torch.int8, device=features.device), "scale": zeros,
                    "offset": zeros.clone()}, None
        flat = features.flatten(-2).double()
        low, high = flat.amin(dim=-1), flat.amax(dim=-1)
        scale = ((high - low) / (2 * levels)).float()
        offset = ((high + low) / 2).float()
        divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).double()[..., None, None]
        steps = (features.double() - offset.double()[..., None, None]) / divisor
        q = torch.clamp(torch.round(steps), -levels, levels).to(torch.int8)
        return {"q": q, "scale": scale, "offset": offset}, None
    return encode


def _decode_int(parts: dict[str, Tensor], basis: LevelBasis | None = None) -> Tensor:
    """q (C, H, W) with scale and offset (C,); or q (E,) with scale and offset (E,), one of each per value."""
    scale, offset = (_float32(parts[name]) for name in ("scale", "offset"))
    if parts["q"].dim() > 1:
        scale, offset = scale[:, None, None], offset[:, None, None]
    return parts["q"].float() * scale + offset


def _float32(values: Tensor) -> Tensor:
    return values if values.dtype == torch.float32 else values.float()


for _name in ("int8", "int6", "int4", "int2"):
    register_device_codec(DeviceCodec(_name, _int_encoder(CODECS[_name].levels), _decode_int))


# --- pca: the store's basis, then rounding ---------------------------------------------------------------------

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
    """``PcaCodec.encode`` in torch for maps (..., C, H, W), in float64 as numpy does
    (``LevelBasis.component_steps``: standardise, rotate (components^T), round half to even to the step), then
    zigzag and two byte planes; the flag is set where a code needs more than two bytes."""
    if basis is None:
        raise ValueError("the pca codec needs the store's basis")
    basis = device_basis(basis, features.device)
    standard = (features.double() - basis.mean[:, None, None]) / basis.scale[:, None, None]
    steps = torch.round(torch.einsum("cd,...chw->...dhw", basis.components, standard) / basis.step)
    codes = torch.where(steps >= 0, 2 * steps, -2 * steps - 1).long()
    too_far = codes.amax() > CODECS["pca"].max_code if codes.numel() else None
    return {"low": (codes & 0xFF).to(torch.uint8), "high": (codes >> 8).to(torch.uint8)}, too_far


def _pca_steps(parts: dict[str, Tensor]) -> Tensor:
    """The signed steps of pca parts of any shape (each value on its own: zigzag of two bytes), float32."""
    codes = parts["low"].long() + 256 * parts["high"].long()
    return ((codes >> 1) ^ -(codes & 1)).float()


def _pca_from_steps(steps: Tensor, basis: LevelBasis | None) -> Tensor:
    """float32 (C, M) steps -> float32 (C, M) values: rotate back, unstandardise."""
    if basis is None:
        raise ValueError("the pca codec needs the store's basis")
    mean, scale, components = _basis_tensors(basis, steps, torch.float32)
    return (components @ (steps * basis.step)) * scale[:, None] + mean[:, None]


def _decode_pca(parts: dict[str, Tensor], basis: LevelBasis | None) -> Tensor:
    """``PcaCodec.decode`` in torch on the parts' device, in float32 (within float32 rounding of numpy's float64)."""
    if basis is None:
        raise ValueError("the pca codec needs the store's basis")
    low = parts["low"]
    return _pca_from_steps(_pca_steps(parts).reshape(low.shape[0], -1), basis).reshape(low.shape)


register_device_codec(DeviceCodec(
    "pca", _encode_pca, _decode_pca, steps=_pca_steps, from_steps=_pca_from_steps, range_error=
    f"features lie too far from the pca basis's mean (beyond +-{CODECS['pca'].max_code // 2} steps): the basis was "
    "fitted on other data; use the int8 codec"))
