"""Feature codecs: how one level's float32 map (C, H, W) becomes named numpy parts and back.

A codec only changes values; compression (zstd) is applied by the store formats to every part. Each family is
one module (``floats``: fp32, fp16; ``ints``: int8, int6, int4, int2; ``pca``) that registers its codecs once in
``CODECS`` (``codec``); print it to see what is available. ``codec_names()`` and ``codec_help()`` give the CLI
its choices and help.
"""

from storage.codecs.codec import (CODECS, Codec, PartKind, checked_features, codec_help, codec_names, map_part,
                                  needs_basis, register)
from storage.codecs.encoded import EncodedLevel, map_shape
from storage.codecs.floats import FloatCodec
from storage.codecs.ints import IntCodec
from storage.codecs.pca import PcaCodec

__all__ = [
    "CODECS", "Codec", "EncodedLevel", "FloatCodec", "IntCodec", "PartKind", "PcaCodec", "checked_features",
    "codec_help", "codec_names", "map_part", "map_shape", "needs_basis", "register",
]
