"""Tiny synthetic manifests and samples, for tests of the store and of code that reads stores.

Features are smooth random fields (a low-resolution Gaussian grid upsampled bilinearly), which
look like FPN maps to a compressor; map sizes are ragged, ``ceil(image_hw / stride)``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from storage.codecs import needs_basis
from storage.manifest import LevelSpec, Manifest
from storage.pca_basis import DEFAULT_STEP, SIDE_NAME, fit_level_basis, level_steps, side_bytes, side_sha256
from storage.sample import Sample


def tiny_manifest(
    *,
    fmt: str = "zarr",
    codec: str = "fp16",
    image_ids: list[int] | None = None,
    n_views: int = 2,
    strides: tuple[int, ...] = (8, 16),
    channels: int = 4,
    max_image_hw: tuple[int, int] = (64, 80),
    samples_per_shard: int = 3,
) -> Manifest:
    """A manifest for a small job: ``image_ids`` default to 5 ids, views are flips. A codec that needs side
    information (pca) gets ``tiny_side``'s basis, which ``write_store`` writes."""
    image_ids = [11, 12, 13, 14, 15] if image_ids is None else image_ids
    levels = [LevelSpec(stride=s, channels=channels, max_height=-(-max_image_hw[0] // s),
                        max_width=-(-max_image_hw[1] // s)) for s in strides]
    if needs_basis(codec):
        plain = tiny_manifest(fmt=fmt, codec="fp32", image_ids=image_ids, n_views=n_views, strides=strides,
                              channels=channels, max_image_hw=max_image_hw, samples_per_shard=samples_per_shard)
        side = tiny_side(plain)
        return dataclasses.replace(plain, codec=codec, codec_side={"file": SIDE_NAME, "sha256": side_sha256(side),
                                                                   "step": DEFAULT_STEP})
    return Manifest(
        format=fmt,
        teacher={"name": "tiny", "variant": "test", "checkpoint_sha256": "0" * 64, "random_init_seed": 0},
        normalization={"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        levels=levels,
        codec=codec,
        views=[{"scale": 1.0, "hflip": bool(v % 2)} for v in range(n_views)],
        dataset={"image_ids": list(image_ids), "annotation_sha256": "1" * 64, "split": "train"},
        samples_per_shard=samples_per_shard,
    )


def smooth_features(rng: np.random.Generator, channels: int, height: int, width: int) -> np.ndarray:
    """float32 (C, H, W) smooth random field with per-channel offsets and scales."""
    coarse = rng.normal(size=(channels, height // 4 + 2, width // 4 + 2))
    ys = np.linspace(0, coarse.shape[1] - 1.001, height)
    xs = np.linspace(0, coarse.shape[2] - 1.001, width)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[None, :, None], (xs - x0)[None, None, :]
    top = coarse[:, y0][:, :, x0] * (1 - fx) + coarse[:, y0][:, :, x0 + 1] * fx
    bottom = coarse[:, y0 + 1][:, :, x0] * (1 - fx) + coarse[:, y0 + 1][:, :, x0 + 1] * fx
    field = top * (1 - fy) + bottom * fy
    scale = rng.uniform(0.5, 3.0, size=(channels, 1, 1))
    offset = rng.normal(size=(channels, 1, 1))
    return (field * scale + offset).astype(np.float32)


def tiny_samples(manifest: Manifest, seed: int = 0) -> list[Sample]:
    """One sample per (image, view) in store order, with ragged image sizes up to the manifest's maxima."""
    rng = np.random.default_rng(seed)
    max_h = min(level.max_height * level.stride for level in manifest.levels)
    max_w = min(level.max_width * level.stride for level in manifest.levels)
    samples = []
    for image_index, image_id in enumerate(manifest.image_ids):
        image_hw = (int(rng.integers(max_h // 2, max_h + 1)), int(rng.integers(max_w // 2, max_w + 1)))
        for view_index in range(manifest.n_views):
            features = {level.stride: smooth_features(rng, level.channels, -(-image_hw[0] // level.stride),
                                                      -(-image_hw[1] // level.stride))
                        for level in manifest.levels}
            samples.append(Sample(index=image_index * manifest.n_views + view_index, image_id=image_id,
                                  view_index=view_index, image_hw=image_hw, features=features))
    return samples


def tiny_side(manifest: Manifest) -> bytes:
    """A pca side file for ``manifest``'s levels: bases fitted on ``tiny_samples(manifest, seed=0)``."""
    samples = tiny_samples(manifest, seed=0)
    steps = level_steps(DEFAULT_STEP, manifest.strides)
    return side_bytes({s: fit_level_basis([sample.features[s] for sample in samples], steps[s])
                       for s in manifest.strides})


def write_store(path: str, manifest: Manifest, samples: list[Sample]):
    """Create, fill and finalize a store at ``path``; returns its finalized manifest."""
    from storage.store import create_store

    side = tiny_side(dataclasses.replace(manifest, codec="fp32", codec_side=None)) if manifest.codec_side else None
    writer = create_store(path, manifest, side=side)
    for k in range(manifest.n_shards):
        span = manifest.shard_range(k)
        writer.write_shard(k, samples[span.start: span.stop])
    return writer.finalize()


def killed_copy(store: Path, killed: Path, unfinished_shards: tuple[int, ...]) -> Path:
    """Copy a finished local ``store`` to ``killed`` in the state a kill leaves: the manifest lists no
    finished shards and ``unfinished_shards`` have no completion marker. Returns ``killed``."""
    shutil.copytree(store, killed)
    manifest_path = killed / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"] = []
    manifest_path.write_text(json.dumps(manifest))
    for k in unfinished_shards:
        (killed / "shards" / f"{k:06d}.json").unlink()
    return killed
