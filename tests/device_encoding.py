"""Test helpers: encode a batch with a codec's torch twin and check its range flag at once."""

from __future__ import annotations

from torch import Tensor

from pkd_offline.device_codecs import DEVICE_CODECS, check_range
from storage.codecs import EncodedLevel
from storage.pca_basis import LevelBasis


def encode_checked(codec: str, features: Tensor, basis: LevelBasis | None = None) -> dict[str, Tensor]:
    """``DEVICE_CODECS[codec].encode`` of maps (..., C, H, W) where they lie, its flag read: ValueError where the
    codec cannot hold the values (fp16 past its range, pca far off its basis)."""
    parts, out_of_range = DEVICE_CODECS[codec].encode(features, basis)
    check_range(codec, out_of_range)
    return parts


def encode_on_device(codec: str, features: Tensor, basis: LevelBasis | None = None) -> list[EncodedLevel]:
    """Encode a batch of one level's maps (N, C, H, W) where they lie and bring the parts to the host: one
    EncodedLevel per map (numpy views of the batch's arrays)."""
    parts = {name: values.cpu().numpy() for name, values in encode_checked(codec, features, basis).items()}
    return [EncodedLevel(codec, {name: values[i] for name, values in parts.items()}) for i in range(len(features))]
