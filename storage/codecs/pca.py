"""The ``pca`` codec: channels decorrelated by the store's per-level basis (``storage.pca_basis``), then rounded."""

from __future__ import annotations

import numpy as np

from storage.codecs.codec import Codec, PartKind, checked_features, register
from storage.errors import StoreError
from storage.pca_basis import LevelBasis

_EPS32 = float(np.finfo(np.float32).eps)


def zigzag(codes: np.ndarray) -> np.ndarray:
    """Signed integer codes to non-negative ones, small magnitudes to small codes (0, -1, 1, -2 -> 0, 1, 2, 3)."""
    codes = np.asarray(codes, np.int64)
    return np.where(codes >= 0, 2 * codes, -2 * codes - 1)


def unzigzag(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes, np.int64)
    return (codes >> 1) ^ -(codes & 1)


class PcaCodec(Codec):
    """Decorrelate, then quantise: per level, the store's basis turns the map into component steps
    (:meth:`LevelBasis.component_steps`: standardise each channel, rotate onto the principal components, round
    to the level's ``step`` in channel std units), stored zigzagged as two byte planes, "low" and "high" uint8
    (C, H, W) (component by component, so zstd finds the runs of zeros of the weak components). Decoding rotates
    back. Needs the store's basis: the registered instance only names the parts; ``bound(basis)`` codes one level.

    Error: each component is within ``step / 2`` of its value, so channel c is within
    ``scale_c * step / 2 * sum_j |components[c, j]|`` of the input (plus float rounding).
    """

    name = "pca"
    bits = None
    needs_basis = True
    description = "channels decorrelated by a per-level basis fitted at extraction, components rounded to --pca-step"
    min_pearson_r = None
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
        features, basis = checked_features(features), self._basis()
        if features.shape[0] != basis.channels:
            raise StoreError(f"the pca basis has {basis.channels} channels, the features {features.shape[0]}")
        steps = basis.component_steps(features)
        codes = zigzag(steps)
        if codes.size and int(codes.max()) > self.max_code:
            raise StoreError(f"features lie {float(np.abs(steps).max() * basis.step):.0f} channel std from the pca "
                             "basis's mean: the basis was fitted on other data; use the int8 codec")
        return {"low": (codes & 0xFF).astype(np.uint8), "high": (codes >> 8).astype(np.uint8)}

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        codes = np.asarray(parts["low"]).astype(np.int64) + 256 * np.asarray(parts["high"]).astype(np.int64)
        return self._basis().features_from_steps(unzigzag(codes))

    def error_bound(self, features: np.ndarray) -> float:
        basis = self._basis()
        if np.size(features) == 0:
            return 0.0
        row_sums = np.abs(basis.components.astype(np.float64)).sum(axis=1)
        magnitude = float(np.abs(features).max())
        return float((basis.scale * row_sums).max() * basis.step / 2) * (1 + 1e-5) + 8 * _EPS32 * magnitude


register(PcaCodec())
