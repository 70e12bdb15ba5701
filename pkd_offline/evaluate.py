"""COCO box evaluation with pycocotools: predictions on view 0, mapped back to original pixels."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pkd_offline.data import CocoDetection, ViewSampler, collate
from pkd_offline.distributed import Ranks
from pkd_offline.views import View, boxes_to_original

STAT_NAMES = ("mAP", "AP50", "AP75", "APs", "APm", "APl")


@torch.no_grad()
def detect(model: torch.nn.Module, batches: Iterable[list[dict]], device: torch.device, *,
           progress: bool = True) -> Iterator[tuple[dict, dict]]:
    """(item, detection) for every item of every batch, the model in eval mode; a detection's ``boxes``
    (K, 4) xyxy are in the item's view pixels, with ``scores`` (K,) and contiguous ``labels`` (K,)."""
    model.eval()
    for batch in tqdm(batches, desc="eval", unit="batch", disable=not progress, leave=False):
        detections, _ = model([item["image"].to(device) for item in batch])
        for item, detection in zip(batch, detections):
            yield item, {key: value.cpu() for key, value in detection.items()}


def coco_results(item: dict, detection: dict, view: View, category_ids: list[int]) -> list[dict]:
    """One item's detections as COCO result dicts (image_id, category_id, bbox xywh in original px, score)."""
    boxes = boxes_to_original(detection["boxes"], view, item["original_hw"])
    boxes[:, 2:] -= boxes[:, :2]
    return [{"image_id": item["image_id"], "category_id": category_ids[label - 1],
             "bbox": [round(v, 2) for v in box], "score": round(score, 5)}
            for box, score, label in zip(boxes.tolist(), detection["scores"].tolist(), detection["labels"].tolist())]


def predict(model: torch.nn.Module, dataset: CocoDetection, device: torch.device, *, batch_size: int = 8,
            workers: int = 0, progress: bool = True, ranks: Ranks = Ranks()) -> list[dict]:
    """COCO result dicts (image_id, category_id, bbox xywh in original px, score) for every image
    (under torchrun: for this rank's share; ``gather_lists`` joins them)."""
    sampler = ViewSampler(len(dataset), len(dataset.views), shuffle=False, random_views=False, rank=ranks.rank,
                          num_replicas=ranks.world_size)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=workers,
                        generator=torch.Generator())  # an own generator keeps the global RNG of a training run intact
    results = []
    for item, detection in detect(model, loader, device, progress=progress):
        results += coco_results(item, detection, dataset.views[item["view_index"]], dataset.category_ids)
    return results


def coco_box_ap(truth, results: list[dict]) -> dict[str, float]:
    """COCO box AP (0..1; -1 where no ground truth of that size) per name in ``STAT_NAMES``.

    ``truth`` holds the ground truth as pycocotools takes it: ``coco`` (a ``pycocotools.coco.COCO``) and
    ``image_ids`` (the images evaluated), as a :class:`CocoDetection` does.
    """
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {name: 0.0 for name in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        detections = truth.coco.loadRes(results)
        evaluator = COCOeval(truth.coco, detections, "bbox")
        evaluator.params.imgIds = truth.image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats[:6])}
