"""A level of one sample as its codec stores it, before decoding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from storage.codecs.codec import map_part
from storage.pca_basis import LevelBasis


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


def map_shape(features: np.ndarray | EncodedLevel) -> tuple[int, ...]:
    """(C, H, W) of one level, whether a float map or an :class:`EncodedLevel`."""
    return features.shape if isinstance(features, EncodedLevel) else np.shape(features)
