"""``pkd-offline verify``: check every shard's sha256, then recompute samples with the teacher and compare
(for a projected level: its projection and sums, recomputed from the fresh map)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pkd_offline.data import CocoDetection
from pkd_offline.distributed import resolve_device
from pkd_offline.errors import PkdError
from pkd_offline.projection import project_image
from pkd_offline.pyramid import level_size
from pkd_offline.views import View
from stages.extract import teacher_autocast
from stages.teachers import load_teacher
from storage import StoreError, open_store

# Lowest Pearson r (stored vs recomputed, per level) each codec must reach. A codec not named here (the
# bits study's int6, int4, int2; pca) must come within ROUND_TRIP_SLACK of its own round trip of the recomputed map:
# the stored map is then as close to the teacher's as that codec can be.
MIN_PEARSON_R = {"fp32": 0.99999, "fp16": 0.9999, "int8": 0.999}
ROUND_TRIP_SLACK = 1e-3


@dataclass
class VerifyConfig:
    store: str = "features/train.zarr"  # a path or an fsspec URL
    data: Path = Path("data/synth")
    checkpoint: Path | None = None
    samples: int = 4
    device: str = "cpu"
    seed: int = 0
    progress: bool = True


def pearson_r(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float(np.array_equal(a, b))


def verify(cfg: VerifyConfig) -> dict:
    """Returns {"ok", "shard_problems", "levels": {stride: {"min_r", "max_abs_error"}}, "text"}."""
    store = open_store(str(cfg.store))
    manifest = store.manifest
    problems = store.verify_shards()
    identity = manifest.teacher
    if "checkpoint_sha256" in identity and cfg.checkpoint is None:
        raise PkdError(f"store {cfg.store} was made from a teacher checkpoint: pass --checkpoint FILE to verify it")
    device = resolve_device(cfg.device)
    views = [View.from_dict(v) for v in manifest.views]
    dataset = CocoDetection(cfg.data, manifest.dataset["split"], views)
    teacher, recomputed_identity = load_teacher(
        identity["name"], checkpoint=cfg.checkpoint, random_init="random_init_seed" in identity,
        variant=identity["variant"], num_classes=dataset.num_classes, seed=identity.get("random_init_seed", 0))
    given, stored = ({k: v for k, v in d.items() if k != "checkpoint_url"} for d in (recomputed_identity, identity))
    if given != stored:  # a URL and a local copy of the same file (same sha256) are the same teacher
        raise PkdError(f"the teacher given ({recomputed_identity}) is not the store's ({identity})")
    teacher.to(device)
    dataset.image_ids = manifest.image_ids
    indices = random.Random(cfg.seed).sample(range(len(store)), min(cfg.samples, len(store)))
    levels: dict[int, dict[str, float]] = {s: {"min_r": 1.0, "max_abs_error": 0.0} for s in manifest.strides}
    for index in sorted(indices):
        try:
            stored = store.read(index)
        except StoreError as error:
            problems.append(f"sample {index}: {error}")
            continue
        item = dataset[divmod(index, manifest.n_views)]
        with torch.inference_mode(), teacher_autocast(device):  # the precision extract used
            features, _ = teacher.features([item["image"].to(device)])
        for stride in manifest.strides:
            fresh = features[stride][0].float().cpu().numpy()
            kept = stored.features[stride]
            if stride in manifest.projected_strides:  # recompute the projection; its sums count in r too
                cross, total, square = project_image(torch.from_numpy(fresh), level_size(item["image_hw"], stride))
                fresh = cross.numpy()
                sums = stored.statistics[stride]
                levels[stride]["min_r"] = min(levels[stride]["min_r"], pearson_r(sums["sum"], total.numpy()),
                                              pearson_r(sums["sum_sq"], square.numpy()))
            if fresh.shape != kept.shape:
                problems.append(f"sample {index} stride {stride}: stored shape {kept.shape} vs recomputed {fresh.shape}")
                continue
            levels[stride]["min_r"] = min(levels[stride]["min_r"], pearson_r(kept, fresh))
            if manifest.codec not in MIN_PEARSON_R:
                codec = store.level_codecs[stride]
                own = pearson_r(codec.decode(codec.encode(fresh)), fresh) - ROUND_TRIP_SLACK
                levels[stride]["threshold"] = min(levels[stride].get("threshold", 1.0), own)
            levels[stride]["max_abs_error"] = max(levels[stride]["max_abs_error"], float(np.abs(kept - fresh).max()))
    threshold = MIN_PEARSON_R.get(manifest.codec, 0.999)
    for level in levels.values():
        level.setdefault("threshold", threshold)
    low = [s for s, level in levels.items() if level["min_r"] < level["threshold"]]
    threshold = min(level["threshold"] for level in levels.values()) if levels else threshold
    ok = not problems and not low
    lines = [f"shards     {manifest.n_shards} checked, {len(problems)} problems"] + [f"  {p}" for p in problems]
    lines.append(f"samples    {len(indices)} recomputed with the teacher (codec {manifest.codec}, needs r >= {threshold:.6g})")
    lines += [f"  stride {s:<4} r {v['min_r']:.6f}  max |error| {v['max_abs_error']:.3g}" for s, v in levels.items()]
    lines.append("OK" if ok else "FAILED: " + "; ".join(problems[:3] + [f"stride {s} r below {levels[s]['threshold']:.4f}" for s in low]))
    return {"ok": ok, "shard_problems": problems, "levels": {str(s): v for s, v in levels.items()},
            "threshold": threshold, "text": "\n".join(lines)}
