"""Integer codecs: per-sample, per-channel affine quantisation to ``int8``, ``int6``, ``int4`` and ``int2``."""

from __future__ import annotations

import numpy as np

from storage.codecs.codec import Codec, PartKind, checked_features, register

_EPS32 = float(np.finfo(np.float32).eps)


class IntCodec(Codec):
    """Per-sample, per-channel affine quantisation to ``bits`` bits: integers in [-L, L] with
    ``L = 2 ** (bits - 1) - 1`` (int8: 127; int6: 31; int4: 7; int2: 1, i.e. the three values -1, 0, 1).

    Parts: "q" int8 (C, H, W) (every width is held in int8; zstd drops the unused high bits);
    "scale" and "offset" float32 (C,), with ``scale = (max - min) / (2 L)`` and
    ``offset = (max + min) / 2`` over the channel's map, so ``decode = q * scale + offset`` is within
    ``scale / 2`` of the input. A constant channel gets ``scale = 0`` and decodes exactly to its value.
    """

    def __init__(self, bits: int, description: str, min_pearson_r: float | None = None) -> None:
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be 2..8, got {bits}")
        self.name = f"int{bits}"
        self.bits = bits
        self.levels = 2 ** (bits - 1) - 1
        self.description = description
        self.min_pearson_r = min_pearson_r

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
        features = checked_features(features)
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


register(IntCodec(8, "8-bit affine quantisation per sample and channel", min_pearson_r=0.999))
register(IntCodec(6, "6-bit affine quantisation per sample and channel"))
register(IntCodec(4, "4-bit affine quantisation per sample and channel"))
register(IntCodec(2, "2-bit affine quantisation per sample and channel (values -1, 0, 1)"))
