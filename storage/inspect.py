"""Summaries of a store: sizes per level, compression against float32, and a content digest."""

from __future__ import annotations

import hashlib

import numpy as np

from storage.base import StoreReader
from storage.manifest import STATISTIC_PARTS


def describe(reader: StoreReader, digest: bool = True) -> dict:
    """Sizes and identity of a store.

    Returns a dict with ``samples``, ``shards``, ``codec``, ``format``, ``bytes_total`` (all
    files), ``bytes_per_image`` (feature bytes per stored sample, summed over levels),
    ``levels`` (stride -> channels, bytes_on_disk, bytes_per_image, fp32_bytes_per_image
    (the sample's map as float32, C*H*W*4, averaged; for a projected level the full teacher map it
    replaces, at the view's padded size), compression_ratio_vs_fp32 (fp32 bytes / stored bytes, so
    4.0 means four times smaller), ``stored`` ("map" or "projection")), ``layout`` (the manifest's)
    and ``digest``.

    ``digest`` is a hex sha256 over every sample in order: its image_id (int64 LE), view_index
    (int16 LE), then per level in stride order the map's (H, W) (int32 LE) and its decoded
    float32 LE values cropped to its own size, then for a projected level its sums (float64 LE).
    It depends on content only, not on format or
    samples_per_shard. Computing it (and fp32 sizes) reads the whole store; ``digest=False``
    skips both (they are then None).
    """
    manifest = reader.manifest
    n = len(reader)
    sizes = reader.bytes_on_disk()
    fp32_bytes = dict.fromkeys(manifest.strides, 0)
    hasher = hashlib.sha256() if digest else None
    projected, divisor = manifest.projected_strides, manifest.layout.get("size_divisor", 1)
    if digest:
        for sample in reader.iter_samples():
            hasher.update(np.array(sample.image_id, "<i8").tobytes() + np.array(sample.view_index, "<i2").tobytes())
            for stride in manifest.strides:
                features = np.ascontiguousarray(sample.features[stride], dtype="<f4")
                hasher.update(np.array(features.shape[1:], "<i4").tobytes() + features.tobytes())
                if stride in projected:
                    for name in STATISTIC_PARTS:
                        hasher.update(np.ascontiguousarray(sample.statistics[stride][name], "<f8").tobytes())
                    padded = [-(-v // divisor) * divisor for v in sample.image_hw]
                    fp32_bytes[stride] += 4 * features.shape[0] * int(np.prod([-(-v // stride) for v in padded]))
                else:
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
            "stored": "projection" if level.stride in projected else "map",
        }
    return {
        "samples": n,
        "shards": manifest.n_shards,
        "codec": manifest.codec,
        "format": manifest.format,
        "layout": manifest.layout,
        "levels": levels,
        "bytes_total": sizes["total"],
        "bytes_per_image": sum(level["bytes_per_image"] for level in levels.values()),
        "digest": hasher.hexdigest() if hasher else None,
    }
