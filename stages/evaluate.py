"""Evaluation stage: COCO box AP of a checkpoint on a split, written as JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pkd_offline.checkpoint import load_detector
from pkd_offline.data import CocoDetection
from pkd_offline.distributed import resolve_device
from pkd_offline.errors import PkdError
from pkd_offline.evaluate import coco_box_ap, predict
from pkd_offline.views import View


@dataclass
class EvalConfig:
    checkpoint: Path = Path("runs/student/model.pt")
    data: Path = Path("data/synth")
    split: str = "val"
    out: Path | None = None
    device: str = "cpu"
    batch_size: int = 8
    workers: int = 0
    progress: bool = True


def evaluate(cfg: EvalConfig) -> dict[str, float]:
    """Box AP (0..1) ``mAP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``; written to ``cfg.out`` if set."""
    device = resolve_device(cfg.device)
    model, content = load_detector(cfg.checkpoint)
    view = View.from_dict(content["views"][0])
    dataset = CocoDetection(cfg.data, cfg.split, [view])
    if list(content["category_ids"]) != dataset.category_ids:
        raise PkdError(f"checkpoint {cfg.checkpoint} was trained on categories {list(content['category_ids'])}, "
                       f"the data has {dataset.category_ids}")
    model.to(device)
    stats = coco_box_ap(dataset, predict(model, dataset, device, batch_size=cfg.batch_size, workers=cfg.workers,
                                         progress=cfg.progress))
    if cfg.out is not None:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(stats, indent=2) + "\n")
    return stats
