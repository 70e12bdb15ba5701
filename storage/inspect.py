"""Summaries of a store: sizes per level, compression against float32, and a content digest."""

from __future__ import annotations

import hashlib

import numpy as np

from storage.base import StoreReader


def describe(reader: StoreReader, digest: bool = True) -> dict:
    """Sizes and identity of a store.

    Returns a dict with ``samples``, ``shards``, ``codec``, ``format``, ``bytes_total`` (all
    files), ``bytes_per_image`` (feature bytes per stored sample, summed over levels),
    ``levels`` (stride -> channels, bytes_on_disk, bytes_per_image, fp32_bytes_per_image
    (the sample's valid map as float32, C*H*W*4, averaged), compression_ratio_vs_fp32
    (fp32 bytes / stored bytes, so 4.0 means four times smaller)) and ``digest``.

    ``digest`` is a hex sha256 over every sample in order: its image_id (int64 LE), view_index
    (int16 LE), then per level in stride order the map's (H, W) (int32 LE) and its decoded
    float32 LE values cropped to its own size. It depends on content only, not on format or
    samples_per_shard. Computing it (and fp32 sizes) reads the whole store; ``digest=False``
    skips both (they are then None).
    """
    manifest = reader.manifest
    n = len(reader)
    sizes = reader.bytes_on_disk()
    fp32_bytes = dict.fromkeys(manifest.strides, 0)
    hasher = hashlib.sha256() if digest else None
    if digest:
        for sample in reader.iter_samples():
            hasher.update(np.array(sample.image_id, "<i8").tobytes() + np.array(sample.view_index, "<i2").tobytes())
            for stride in manifest.strides:
                features = np.ascontiguousarray(sample.features[stride], dtype="<f4")
                hasher.update(np.array(features.shape[1:], "<i4").tobytes() + features.tobytes())
                fp32_bytes[stride] += features.nbytes
    levels = {}
    for level in manifest.levels:
        stored = sizes["levels"][level.stride]
        per_image = stored / n if n else 0.0
        fp32_per_image = fp32_bytes[level.stride] / n if (n and digest) else None
        levels[level.stride] = {
            "channels": level.channels,
            "bytes_on_disk": stored,
            "bytes_per_image": per_image,
            "fp32_bytes_per_image": fp32_per_image,
            "compression_ratio_vs_fp32": fp32_per_image / per_image if (fp32_per_image and per_image) else None,
        }
    return {
        "samples": n,
        "shards": manifest.n_shards,
        "codec": manifest.codec,
        "format": manifest.format,
        "levels": levels,
        "bytes_total": sizes["total"],
        "bytes_per_image": sum(level["bytes_per_image"] for level in levels.values()),
        "digest": hasher.hexdigest() if hasher else None,
    }
