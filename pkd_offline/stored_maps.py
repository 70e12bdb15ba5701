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
from storage.codecs import EncodedLevel, map_part


@dataclass
class EncodedMap:
    """One level of one sample as its codec stores it, as tensors: ``parts`` {name: Tensor} (a "map" part
    (C, H, W), a "channel" part (C,)). ``decode(device)`` gives the float32 (C, H, W) map there."""

    codec: str
    parts: dict[str, Tensor]

    @classmethod
    def from_level(cls, level: EncodedLevel) -> EncodedMap:
        return cls(level.codec, {name: torch.from_numpy(values) for name, values in level.parts.items()})

    @property
    def shape(self) -> torch.Size:
        """The decoded map's (C, H, W)."""
        return self.parts[map_part(self.codec)].shape

    def decode(self, device: torch.device | str | None = None) -> Tensor:
        parts = {name: values.to(device, non_blocking=True) for name, values in self.parts.items()}
        return DECODERS[self.codec](parts)

    def pin_memory(self) -> EncodedMap:
        """A copy in page-locked memory (DataLoader ``pin_memory``), so the copy to the GPU runs asynchronously."""
        return EncodedMap(self.codec, {name: values.pin_memory() for name, values in self.parts.items()})


def dense_map(features: Tensor | EncodedMap, device: torch.device | str | None = None) -> Tensor:
    """A level's map as a tensor: an EncodedMap decoded on ``device`` (float32), a tensor as it is."""
    return features.decode(device) if isinstance(features, EncodedMap) else features


def _encode_float(dtype: torch.dtype, name: str) -> Callable[[Tensor], dict[str, Tensor]]:
    limit = float(torch.finfo(dtype).max)

    def encode(features: Tensor) -> dict[str, Tensor]:
        features = features.float()
        if features.numel() and max(float(features.amax()), -float(features.amin())) > limit:
            raise ValueError(f"features exceed the {name} range (|x| > {limit:g}): use the fp32 codec")
        return {"values": features.to(dtype)}
    return encode


def _encode_int8(features: Tensor) -> dict[str, Tensor]:
    """``Int8Codec.encode`` in torch, for maps (..., C, H, W): per map and channel, the range in float64,
    steps rounded half to even and clipped to +-127."""
    levels = CODECS["int8"].levels
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


def _decode_float(parts: dict[str, Tensor]) -> Tensor:
    return parts["values"].float()


def _decode_int8(parts: dict[str, Tensor]) -> Tensor:
    return parts["q"].float() * parts["scale"].float()[:, None, None] + parts["offset"].float()[:, None, None]


ENCODERS: dict[str, Callable[[Tensor], dict[str, Tensor]]] = {
    "fp32": _encode_float(torch.float32, "fp32"),
    "fp16": _encode_float(torch.float16, "fp16"),
    "int8": _encode_int8,
}
"""codec name -> encode(float (..., C, H, W) on any device) -> parts as ``CODECS[name].encode`` makes them
for each (C, H, W) map."""

DECODERS: dict[str, Callable[[Tensor], dict[str, Tensor]]] = {
    "fp32": _decode_float,
    "fp16": _decode_float,
    "int8": _decode_int8,
}
"""codec name -> decode(parts on a device) -> float32 (C, H, W) there, as ``CODECS[name].decode``."""


def encode_on_device(codec: str, features: Tensor) -> list[EncodedLevel]:
    """Encode a batch of one level's maps (N, C, H, W) where they lie and bring the parts to the host:
    one EncodedLevel per map (numpy views of the batch's arrays). ValueError where the codec cannot hold
    the values (fp16 past its range)."""
    parts = {name: values.cpu().numpy() for name, values in ENCODERS[codec](features).items()}
    return [EncodedLevel(codec, {name: values[i] for name, values in parts.items()}) for i in range(len(features))]
