"""Float codecs: ``fp32`` (exact) and ``fp16`` (half precision)."""

from __future__ import annotations

import numpy as np

from storage.codecs.codec import Codec, PartKind, checked_features, register
from storage.errors import StoreError


class FloatCodec(Codec):
    """Casts to a float dtype ("values", map part); ``fp32`` is exact, ``fp16`` rounds to half precision."""

    def __init__(self, name: str, dtype: type, description: str, min_pearson_r: float) -> None:
        self.name = name
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.bits = 8 * self.dtype.itemsize
        self.description = description
        self.min_pearson_r = min_pearson_r

    def part_layout(self, channels: int) -> dict[str, tuple[np.dtype, PartKind]]:
        return {"values": (self.dtype, "map")}

    def encode(self, features: np.ndarray) -> dict[str, np.ndarray]:
        features = checked_features(features)
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


register(FloatCodec("fp32", np.float32, "float32 as the teacher computed it (exact)", min_pearson_r=0.99999))
register(FloatCodec("fp16", np.float16, "float16, half the bytes (refuses |x| > 65504)", min_pearson_r=0.9999))
