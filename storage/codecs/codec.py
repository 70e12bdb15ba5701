"""What a codec is and where codecs are known by name: the :class:`Codec` interface and the ``CODECS`` registry.

Each codec family lives in its own module (``floats``, ``ints``, ``pca``) and registers its instances once with
:func:`register`; everything that needs to know about codecs (the stores, the manifest, the torch twins in
``pkd_offline.device_codecs``, ``pkd-offline verify``, the CLI's ``--codec`` choices) asks ``CODECS``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from storage.errors import StoreError

PartKind = Literal["map", "channel"]


class Codec:
    """Encodes float32 features (C, H, W) into named numpy parts and back.

    Registration attributes:

    - ``name``: the codec's name in a manifest and on the command line;
    - ``bits``: the bits each value is quantised to (fp16: 16, int4: 4); None where the stored precision
      follows from a fitted step instead (pca);
    - ``needs_basis``: True where encode and decode need the store's side information (``storage.pca_basis``):
      the registered instance only names the parts, ``bound(basis)`` gives one that codes a level;
    - ``description``: one line for the CLI's help;
    - ``min_pearson_r``: the lowest Pearson r between stored and recomputed maps ``pkd-offline verify`` accepts;
      None: the stored map must come within ``stages.verify.ROUND_TRIP_SLACK`` of the codec's own round trip
      of the recomputed map.

    ``part_layout(C)`` names each part's dtype and kind: a "map" part is (C, H, W), a "channel" part is (C,).
    ``error_bound(x)`` is the largest absolute error ``|decode(encode(x)) - x|`` the codec guarantees for ``x``,
    in feature units.
    """

    name: str
    bits: int | None
    needs_basis: bool = False
    description: str
    min_pearson_r: float | None = None

    def part_layout(self, channels: int) -> dict[str, tuple[np.dtype, PartKind]]:
        raise NotImplementedError

    def encode(self, features: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def error_bound(self, features: np.ndarray) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}: {self.description})"


CODECS: dict[str, Codec] = {}
"""codec name -> its registered :class:`Codec`, in registration order; print it to see what is available."""


def register(codec: Codec) -> Codec:
    """Make ``codec`` known by its name (ValueError if the name is taken); returns it."""
    if codec.name in CODECS:
        raise ValueError(f"codec {codec.name!r} is registered twice")
    CODECS[codec.name] = codec
    return codec


def codec_names() -> list[str]:
    """The registered codecs' names, in registration order (the CLI's ``--codec`` choices)."""
    return list(CODECS)


def codec_help() -> str:
    """Every codec as ``name: description``, joined by "; ", for the CLI's ``--codec`` help."""
    return "; ".join(f"{name}: {codec.description}" for name, codec in CODECS.items())


def needs_basis(codec: str) -> bool:
    """Whether codec ``codec`` encodes and decodes only with the store's side information (False if unknown)."""
    return codec in CODECS and CODECS[codec].needs_basis


def map_part(codec: str) -> str:
    """The name of the codec's (C, H, W) part (its other parts are per channel)."""
    return next(name for name, (_, kind) in CODECS[codec].part_layout(0).items() if kind == "map")


def checked_features(features: np.ndarray) -> np.ndarray:
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
