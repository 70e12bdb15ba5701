"""Feature codecs: how one level's float32 map (C, H, W) becomes named numpy parts and back.

A codec only changes values; compression (zstd) is applied by the store formats to every part.
``CODECS`` maps a codec's name to it; print it to see what is available.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from storage.errors import StoreError

PartKind = Literal["map", "channel"]
_EPS32 = float(np.finfo(np.float32).eps)


@dataclass
class EncodedLevel:
    """One level of one sample as its codec stores it, not decoded: ``parts`` {name: array} as
    ``Codec.part_layout`` names them ("map" parts (C, H, W), "channel" parts (C,)). Extraction hands the
    writer levels already encoded (on the teacher's device); a reader with ``keep_encoded`` returns them,
    so training moves compact values and decodes on its own device."""

    codec: str
    parts: dict[str, np.ndarray]

    @property
    def shape(self) -> tuple[int, ...]:
        """The decoded map's (C, H, W)."""
        return np.shape(self.parts[map_part(self.codec)])


def map_part(codec: str) -> str:
    """The name of the codec's (C, H, W) part (its other parts are per channel)."""
    return next(name for name, (_, kind) in CODECS[codec].part_layout(0).items() if kind == "map")


def map_shape(features: np.ndarray | EncodedLevel) -> tuple[int, ...]:
    """(C, H, W) of one level, whether a float map or an :class:`EncodedLevel`."""
    return features.shape if isinstance(features, EncodedLevel) else np.shape(features)


class Codec:
    """Encodes float32 features (C, H, W) into named parts.

    ``part_layout(C)`` names each part's dtype and kind: a "map" part is (C, H, W), a
    "channel" part is (C,). ``error_bound(x)`` is the largest absolute error
    ``|decode(encode(x)) - x|`` the codec guarantees for ``x``, in feature units.
    """

    name: str

    def part_layout(self, channels: int) -> dict[str, tuple[np.dtype, PartKind]]:
        raise NotImplementedError

    def encode(self, features: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def error_bound(self, features: np.ndarray) -> float:
        raise NotImplementedError


def _checked(features: np.ndarray) -> np.ndarray:
    """Return ``features`` as float32 (C, H, W); StoreError if not 3-D, not floating point or not finite."""
    features = np.asarray(features)
    if features.ndim != 3 or features.dtype.kind != "f":
        raise StoreError(f"features must be a floating point (C, H, W) array, got {features.dtype} {features.shape}")
    features = features.astype(np.float32, copy=False)
    if not np.isfinite(features).all():
        bad = int(np.size(features) - np.count_nonzero(np.isfinite(features)))
        raise StoreError(f"features hold {bad} NaN/Inf values: the teacher diverged or its input is broken; "
                         "fix the teacher before extracting")
    return features


class FloatCodec(Codec):
    """Casts to a float dtype ("values", map part); ``fp32`` is exact, ``fp16`` rounds to half precision."""

    def __init__(self, name: str, dtype: type) -> None:
        self.name = name
        self.dtype = np.dtype(dtype).newbyteorder("<")

    def part_layout(self, channels: int) -> dict[str, tuple[np.dtype, PartKind]]:
        return {"values": (self.dtype, "map")}

    def encode(self, features: np.ndarray) -> dict[str, np.ndarray]:
        features = _checked(features)
        limit = float(np.finfo(self.dtype).max)
        if features.size and float(np.abs(features).max()) > limit:
            raise StoreError(f"features exceed the {self.name} range (|x| > {limit:g}): use the fp32 codec")
        return {"values": features.astype(self.dtype)}

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(parts["values"]).astype(np.float32)

    def error_bound(self, features: np.ndarray) -> float:
        if self.dtype == np.float32 or np.size(features) == 0:
            return 0.0
        info = np.finfo(self.dtype)
        unit_roundoff = float(info.eps) / 2
        smallest_subnormal_half = float(info.smallest_subnormal) / 2
        return float(np.abs(features).max()) * unit_roundoff + smallest_subnormal_half


class Int8Codec(Codec):
    """Per-sample, per-channel affine quantisation to int8 in [-127, 127].

    Parts: "q" int8 (C, H, W); "scale" and "offset" float32 (C,), with
    ``scale = (max - min) / 254`` and ``offset = (max + min) / 2`` over the channel's map,
    so ``decode = q * scale + offset`` is within ``scale / 2`` of the input. A constant
    channel gets ``scale = 0`` and decodes exactly to its value.
    """

    name = "int8"
    levels = 127

    def part_layout(self, channels: int) -> dict[str, tuple[np.dtype, PartKind]]:
        return {"q": (np.dtype("i1"), "map"), "scale": (np.dtype("<f4"), "channel"),
                "offset": (np.dtype("<f4"), "channel")}

    def _scale_offset(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        channels = features.shape[0]
        if features.shape[1] * features.shape[2] == 0:
            return np.zeros(channels, np.float32), np.zeros(channels, np.float32)
        flat = features.reshape(channels, -1).astype(np.float64)
        low, high = flat.min(axis=1), flat.max(axis=1)
        scale = ((high - low) / (2 * self.levels)).astype(np.float32)
        offset = ((high + low) / 2).astype(np.float32)
        return scale, offset

    def encode(self, features: np.ndarray) -> dict[str, np.ndarray]:
        features = _checked(features)
        scale, offset = self._scale_offset(features)
        divisor = np.where(scale > 0, scale, 1).astype(np.float64)[:, None, None]
        steps = (features - offset.astype(np.float64)[:, None, None]) / divisor
        q = np.clip(np.rint(steps), -self.levels, self.levels).astype(np.int8)
        return {"q": q, "scale": scale, "offset": offset}

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        scale = np.asarray(parts["scale"], np.float32)[:, None, None]
        offset = np.asarray(parts["offset"], np.float32)[:, None, None]
        return np.asarray(parts["q"]).astype(np.float32) * scale + offset

    def error_bound(self, features: np.ndarray) -> float:
        if np.size(features) == 0:
            return 0.0
        scale, _ = self._scale_offset(np.asarray(features, np.float32))
        magnitude = float(np.abs(features).max())
        # float32 rounding of scale, offset and the decode arithmetic adds a few ulps of |x|.
        return float(scale.max()) / 2 * (1 + 1e-5) + 8 * _EPS32 * magnitude


CODECS: dict[str, Codec] = {
    "fp32": FloatCodec("fp32", np.float32),
    "fp16": FloatCodec("fp16", np.float16),
    "int8": Int8Codec(),
}
