"""COCO box evaluation with pycocotools: predictions on view 0, mapped back to original pixels."""

from __future__ import annotations

import contextlib
import io

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pkd_offline.data import CocoDetection, ViewSampler, collate
from pkd_offline.distributed import Ranks
from pkd_offline.views import boxes_to_original

STAT_NAMES = ("mAP", "AP50", "AP75", "APs", "APm", "APl")


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: CocoDetection, device: torch.device, *, batch_size: int = 8,
            workers: int = 0, progress: bool = True, ranks: Ranks = Ranks()) -> list[dict]:
    """COCO result dicts (image_id, category_id, bbox xywh in original px, score) for every image
    (under torchrun: for this rank's share; ``gather_lists`` joins them)."""
    model.eval()
    sampler = ViewSampler(len(dataset), len(dataset.views), shuffle=False, random_views=False, rank=ranks.rank,
                          num_replicas=ranks.world_size)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=workers,
                        generator=torch.Generator())  # an own generator keeps the global RNG of a training run intact
    results = []
    for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
        detections, _ = model([item["image"].to(device) for item in batch])
        for item, detection in zip(batch, detections):
            boxes = boxes_to_original(detection["boxes"].cpu(), dataset.views[item["view_index"]], item["original_hw"])
            boxes[:, 2:] -= boxes[:, :2]
            for box, score, label in zip(boxes.tolist(), detection["scores"].tolist(), detection["labels"].tolist()):
                results.append({"image_id": item["image_id"], "category_id": dataset.category_ids[label - 1],
                                "bbox": [round(v, 2) for v in box], "score": round(score, 5)})
    return results


def coco_box_ap(dataset: CocoDetection, results: list[dict]) -> dict[str, float]:
    """COCO box AP (0..1; -1 where no ground truth of that size) per name in ``STAT_NAMES``."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {name: 0.0 for name in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        detections = dataset.coco.loadRes(results)
        evaluator = COCOeval(dataset.coco, detections, "bbox")
        evaluator.params.imgIds = dataset.image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats[:6])}
