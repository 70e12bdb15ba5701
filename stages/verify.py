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
from pkd_offline.config import WEIGHTS_HELP, setting
from pkd_offline.projection import project_image
from pkd_offline.pyramid import level_size
from pkd_offline.views import View
from pkd_offline.precision import forward_autocast
from pkd_offline.teachers import load_teacher
from storage import CODECS, StoreError, open_store
from storage.codecs import Codec
from storage.sample import Sample

# A codec whose registration names no ``min_pearson_r`` (storage.codecs.Codec) must come within ROUND_TRIP_SLACK of
# its own round trip of the recomputed map: the stored map is then as close to the teacher's as that codec can be.
ROUND_TRIP_SLACK = 1e-3
UNCOMPARED_MIN_R = 0.999  # such a codec's threshold at a level no sample was compared at


@dataclass
class VerifyConfig:
    store: str = setting("features/train.zarr", help="the store to check: a path or an fsspec URL (s3://...)",
                         flag="store")
    data: Path = setting(Path("data/synth"), help="the data directory the store was extracted from")
    checkpoint: Path | None = setting(None, help=f"the store's teacher weights: {WEIGHTS_HELP}")
    samples: int = setting(4, help="samples recomputed with the teacher and compared with the stored ones")
    device: str = setting("cpu", help="torch device for the teacher (cpu, cuda, cuda:N)")
    seed: int = setting(0, help="seed of the samples drawn for recomputation")
    progress: bool = setting(True, help="no progress bars")


def pearson_r(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float(np.array_equal(a, b))


def verify(cfg: VerifyConfig) -> dict:
    """Returns {"ok", "shard_problems", "levels": {stride: {"min_r", "max_abs_error", "threshold"}}, "threshold",
    "text"}."""
    store = open_store(str(cfg.store))
    manifest = store.manifest
    problems = store.verify_shards()
    if "checkpoint_sha256" in manifest.teacher and cfg.checkpoint is None:
        raise PkdError(f"store {cfg.store} was made from a teacher checkpoint: pass --checkpoint FILE to verify it")
    device = resolve_device(cfg.device)
    dataset = CocoDetection(cfg.data, manifest.dataset["split"], [View.from_dict(v) for v in manifest.views])
    teacher = store_teacher(manifest.teacher, cfg.checkpoint, dataset.num_classes).to(device)
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
        with torch.inference_mode(), forward_autocast(device):  # the precision extract used
            features, _ = teacher.features([item["image"].to(device)])
        for stride in manifest.strides:
            problem = compare_level(levels[stride], stored, stride, features[stride][0].float().cpu().numpy(),
                                    item["image_hw"] if stride in manifest.projected_strides else None,
                                    store.level_codecs[stride])
            if problem:
                problems.append(f"sample {index} stride {stride}: {problem}")
    return summary(manifest.n_shards, manifest.codec, problems, levels, len(indices))


def store_teacher(identity: dict, checkpoint: Path | None, num_classes: int) -> torch.nn.Module:
    """The teacher the store's manifest names (``identity``), loaded again; PkdError if it is another one."""
    teacher, recomputed_identity = load_teacher(
        identity["name"], checkpoint=checkpoint, random_init="random_init_seed" in identity,
        variant=identity["variant"], num_classes=num_classes, seed=identity.get("random_init_seed", 0))
    given, stored = ({k: v for k, v in d.items() if k != "checkpoint_url"} for d in (recomputed_identity, identity))
    if given != stored:  # a URL and a local copy of the same file (same sha256) are the same teacher
        raise PkdError(f"the teacher given ({recomputed_identity}) is not the store's ({identity})")
    return teacher


def compare_level(level: dict[str, float], stored: Sample, stride: int, fresh: np.ndarray,
                  projected_hw: tuple[int, int] | None, codec: Codec) -> str | None:
    """Fold one sample's level into ``level`` ({"min_r", "max_abs_error"} so far, and "threshold" for a codec
    judged by its own round trip): ``fresh`` is the recomputed map (C, H, W) float32; ``projected_hw`` the image's
    (h, w) px where the store holds the level projected (the projection and its sums are recomputed from
    ``fresh`` and the sums count in r too), else None. Returns a problem where the shapes differ, else None."""
    kept = stored.features[stride]
    if projected_hw is not None:
        cross, total, square = project_image(torch.from_numpy(fresh), level_size(projected_hw, stride))
        fresh, sums = cross.numpy(), stored.statistics[stride]
        level["min_r"] = min(level["min_r"], pearson_r(sums["sum"], total.numpy()),
                             pearson_r(sums["sum_sq"], square.numpy()))
    if fresh.shape != kept.shape:
        return f"stored shape {kept.shape} vs recomputed {fresh.shape}"
    level["min_r"] = min(level["min_r"], pearson_r(kept, fresh))
    if codec.min_pearson_r is None:
        own = pearson_r(codec.decode(codec.encode(fresh)), fresh) - ROUND_TRIP_SLACK
        level["threshold"] = min(level.get("threshold", 1.0), own)
    level["max_abs_error"] = max(level["max_abs_error"], float(np.abs(kept - fresh).max()))
    return None


def summary(n_shards: int, codec: str, problems: list[str], levels: dict[int, dict[str, float]], samples: int) -> dict:
    """verify's result: every level's threshold (the codec's ``min_pearson_r``, or its round trip's), which levels
    fall below it, and the report's text."""
    registered = CODECS[codec].min_pearson_r
    threshold = UNCOMPARED_MIN_R if registered is None else registered
    for level in levels.values():
        level.setdefault("threshold", threshold)
    low = [s for s, level in levels.items() if level["min_r"] < level["threshold"]]
    threshold = min(level["threshold"] for level in levels.values()) if levels else threshold
    ok = not problems and not low
    lines = [f"shards     {n_shards} checked, {len(problems)} problems"] + [f"  {p}" for p in problems]
    lines.append(f"samples    {samples} recomputed with the teacher (codec {codec}, needs r >= {threshold:.6g})")
    lines += [f"  stride {s:<4} r {v['min_r']:.6f}  max |error| {v['max_abs_error']:.3g}" for s, v in levels.items()]
    lines.append("OK" if ok else "FAILED: " + "; ".join(problems[:3] + [f"stride {s} r below {levels[s]['threshold']:.4f}" for s in low]))
    return {"ok": ok, "shard_problems": problems, "levels": {str(s): v for s, v in levels.items()},
            "threshold": threshold, "text": "\n".join(lines)}
