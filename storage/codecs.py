"""Feature codecs: how one level's float32 map (C, H, W) becomes named numpy parts and back.

A codec only changes values; compression (zstd) is applied by the store formats to every part.
``CODECS`` maps a codec's name to it; print it to see what is available.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from storage.errors import StoreError
from storage.pca_basis import LevelBasis

PartKind = Literal["map", "channel"]
_EPS32 = float(np.finfo(np.float32).eps)


@dataclass
class EncodedLevel:
    """One level of one sample as its codec stores it, not decoded: ``parts`` {name: array} as
    ``Codec.part_layout`` names them ("map" parts (C, H, W), "channel" parts (C,)). Extraction hands the
    writer levels already encoded (on the teacher's device); a reader with ``keep_encoded`` returns them,
    so training moves compact values and decodes on its own device (with ``basis`` where the codec needs it)."""

    codec: str
    parts: dict[str, np.ndarray]
    basis: LevelBasis | None = None  # the level's basis, for a codec that needs one (pca)

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


class IntCodec(Codec):
    """Per-sample, per-channel affine quantisation to ``bits`` bits: integers in [-L, L] with
    ``L = 2 ** (bits - 1) - 1`` (int8: 127; int6: 31; int4: 7; int2: 1, i.e. the three values -1, 0, 1).

    Parts: "q" int8 (C, H, W) (every width is held in int8; zstd drops the unused high bits);
    "scale" and "offset" float32 (C,), with ``scale = (max - min) / (2 L)`` and
    ``offset = (max + min) / 2`` over the channel's map, so ``decode = q * scale + offset`` is within
    ``scale / 2`` of the input. A constant channel gets ``scale = 0`` and decodes exactly to its value.
    The widths below 8 are the operating points of the bits study (benchmarks/bits_study.py, the accuracy
    study's ``offline_index_intK`` arms).
    """

    def __init__(self, bits: int) -> None:
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be 2..8, got {bits}")
        self.name = f"int{bits}"
        self.bits = bits
        self.levels = 2 ** (bits - 1) - 1

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


def zigzag(codes: np.ndarray) -> np.ndarray:
    """Signed integer codes to non-negative ones, small magnitudes to small codes (0, -1, 1, -2 -> 0, 1, 2, 3)."""
    codes = np.asarray(codes, np.int64)
    return np.where(codes >= 0, 2 * codes, -2 * codes - 1)


def unzigzag(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes, np.int64)
    return (codes >> 1) ^ -(codes & 1)


class PcaCodec(Codec):
    """Decorrelate, then quantise (``storage.pca_basis``): per level, standardise each channel with the store's
    basis, rotate onto its principal components, round each component to the level's ``step`` (channel std units)
    and store the zigzagged codes as two byte planes, "low" and "high" uint8 (C, H, W) (component by component, so
    zstd finds the runs of zeros of the weak components). Decoding rotates back. Needs the store's basis: the
    instance in ``CODECS`` only names the parts; ``bound(basis)`` encodes and decodes one level.

    Error: each component is within ``step / 2`` of its value, so channel c is within
    ``scale_c * step / 2 * sum_j |components[c, j]|`` of the input (plus float rounding).
    """

    name = "pca"
    max_code = 2 ** 16 - 1  # zigzag codes fit two bytes: components within +-32767 steps

    def __init__(self, basis: LevelBasis | None = None) -> None:
        self.basis = basis

    def bound(self, basis: LevelBasis) -> PcaCodec:
        return PcaCodec(basis)

    def part_layout(self, channels: int) -> dict[str, tuple[np.dtype, PartKind]]:
        return {"low": (np.dtype("u1"), "map"), "high": (np.dtype("u1"), "map")}

    def _basis(self) -> LevelBasis:
        if self.basis is None:
            raise StoreError("the pca codec needs the store's basis (storage.pca_basis): open the store to use it")
        return self.basis

    def encode(self, features: np.ndarray) -> dict[str, np.ndarray]:
        features, basis = _checked(features), self._basis()
        channels, height, width = features.shape
        if channels != basis.channels:
            raise StoreError(f"the pca basis has {basis.channels} channels, the features {channels}")
        flat = features.reshape(channels, -1).astype(np.float64)
        standard = (flat - basis.mean.astype(np.float64)[:, None]) / basis.scale.astype(np.float64)[:, None]
        steps = np.rint(basis.components.T.astype(np.float64) @ standard / basis.step)
        codes = zigzag(steps)
        if codes.size and int(codes.max()) > self.max_code:
            raise StoreError(f"features lie {float(np.abs(steps).max() * basis.step):.0f} channel std from the pca "
                             "basis's mean: the basis was fitted on other data; use the int8 codec")
        codes = codes.reshape(channels, height, width)
        return {"low": (codes & 0xFF).astype(np.uint8), "high": (codes >> 8).astype(np.uint8)}

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        basis = self._basis()
        low = np.asarray(parts["low"])
        codes = unzigzag(low.astype(np.int64) + 256 * np.asarray(parts["high"]).astype(np.int64))
        channels = low.shape[0]
        standard = basis.components.astype(np.float64) @ (codes.reshape(channels, -1) * basis.step)
        flat = standard * basis.scale.astype(np.float64)[:, None] + basis.mean.astype(np.float64)[:, None]
        return flat.astype(np.float32).reshape(low.shape)

    def error_bound(self, features: np.ndarray) -> float:
        basis = self._basis()
        if np.size(features) == 0:
            return 0.0
        row_sums = np.abs(basis.components.astype(np.float64)).sum(axis=1)
        magnitude = float(np.abs(features).max())
        return float((basis.scale * row_sums).max() * basis.step / 2) * (1 + 1e-5) + 8 * _EPS32 * magnitude


CODECS: dict[str, Codec] = {
    "fp32": FloatCodec("fp32", np.float32),
    "fp16": FloatCodec("fp16", np.float16),
    "int8": IntCodec(8),
    "int6": IntCodec(6),
    "int4": IntCodec(4),
    "int2": IntCodec(2),
    "pca": PcaCodec(),
}


def needs_basis(codec: str) -> bool:
    """Whether the codec encodes and decodes only with the store's side information (``storage.pca_basis``)."""
    return isinstance(CODECS.get(codec), PcaCodec)
