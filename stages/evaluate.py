"""Evaluation stage: COCO box AP of a checkpoint on a val set, written as JSON.

The val set is a data directory (``--data DIR --split val``: images and the annotation file), or a
WebDataset store written with ``extract --split val --with-images`` (``--store STORE``, local or a
URL such as ``s3://bucket/val/``), read in one sequential pass, each rank and DataLoader worker its
own shards. A store holds each image's file and its non-crowd boxes and labels in the view's pixels;
the ground truth handed to pycocotools is those boxes mapped back to the original image's pixels,
with the box's area as its area (the annotation file's crowd regions and segment areas are not in a
store: where the data has them, ``--data`` gives the official figure).
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pkd_offline.checkpoint import load_detector
from pkd_offline.config import WEIGHTS_HELP, check_config, setting
from pkd_offline.data import CocoDetection, collate
from pkd_offline.distributed import Ranks, gather_lists, resolve_device
from pkd_offline.errors import PkdError
from pkd_offline.evaluate import coco_box_ap, coco_results, detect, predict
from pkd_offline.views import View, boxes_to_original
from pkd_offline.store_data import StoreImages
from storage import open_store


@dataclass
class EvalConfig:
    """What `eval` measures: a checkpoint on a val set (a data directory or a val store)."""

    checkpoint: Path = setting(Path("runs/student/model.pt"), help=f"a model.pt: {WEIGHTS_HELP}")
    data: Path = setting(Path("data/synth"), help="data directory (images and annotations/instances_SPLIT.json)")
    split: str = setting("val", help="split of --data to evaluate on")
    store: str | None = setting(None, help="read the val set from this store (path or URL) written by `extract "
                                           "--split val --with-images`, instead of --data")
    out: Path | None = setting(None, help="write the metrics JSON here")
    device: str = setting("cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    batch_size: int = setting(8, help="images per forward pass")
    workers: int = setting(0, help="DataLoader worker processes")
    progress: bool = setting(True, help="no progress bars")


class StoreValSet(IterableDataset):
    """The val set of a WebDataset store written with ``--with-images``: one item per image, the image's
    samples of the stored view equal to ``view`` (the view the model is evaluated at), as
    :meth:`StoreImages.item` makes them (``image`` (3, h, w) float32 0..1, ``target`` boxes (K, 4) xyxy
    view px). Each rank, and each DataLoader worker, streams its own shards (``shard k`` goes to reader
    ``k % (num_replicas * workers)``).
    """

    def __init__(self, store_path: str | Path, view: View, *, rank: int = 0, num_replicas: int = 1) -> None:
        self.store_path, self.view, self.rank, self.num_replicas = str(store_path), view, rank, num_replicas
        store = open_store(self.store_path)
        manifest = store.manifest
        fix = "write one with `extract --split val --with-images` (WebDataset), or evaluate on --data DIR"
        if manifest.format != "wds":
            raise PkdError(f"val store {store_path} is {manifest.format}: a val set is read from a WebDataset store; "
                           f"{fix}")
        if manifest.n_samples == 0 or not {"jpg", "target.json"} <= set(store.read(0).extras):
            raise PkdError(f"val store {store_path} holds no images and targets (extracted without --with-images); "
                           f"{fix}")
        if manifest.categories is None:
            raise PkdError(f"val store {store_path} records no categories (written by an older version); {fix}")
        views = [View.from_dict(v) for v in manifest.views]
        if view not in views:
            raise PkdError(f"val store {store_path} holds views {[v.to_dict() for v in views]}, not the view the model "
                           f"is evaluated at, {view.to_dict()}: re-extract it with --short-side {view.short_side} "
                           f"--max-size {view.max_size}")
        self.view_index = views.index(view)
        self.images = StoreImages(self.store_path, manifest, views)
        self.categories: list[dict] = list(manifest.categories)
        self.n_shards = manifest.n_shards

    @property
    def category_ids(self) -> list[int]:
        return self.images.category_ids

    def shards(self) -> list[int]:
        """The shards this reader (rank, DataLoader worker) streams."""
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        return list(range(self.rank * workers + worker, self.n_shards, self.num_replicas * workers))

    def __iter__(self):
        store = open_store(self.store_path)
        image_index = {image_id: i for i, image_id in enumerate(self.images.image_ids)}
        for sample in store.iter_samples(self.shards()):
            if sample.view_index == self.view_index:
                yield self.images.item(image_index[sample.image_id], sample)


def ground_truth(item: dict, view: View, category_ids: list[int]) -> dict:
    """One item's ground truth in the original image's pixels: {"image": {"id", "height", "width"},
    "annotations": [{"image_id", "category_id", "bbox" xywh px, "area" px^2, "iscrowd": 0}]}."""
    height, width = item["original_hw"]
    boxes = boxes_to_original(item["target"]["boxes"], view, (height, width)).double()
    boxes[:, 2:] -= boxes[:, :2]
    annotations = [{"image_id": item["image_id"], "category_id": category_ids[label - 1], "bbox": box,
                    "area": box[2] * box[3], "iscrowd": 0}
                   for box, label in zip(boxes.tolist(), item["target"]["labels"].tolist())]
    return {"image": {"id": item["image_id"], "height": height, "width": width}, "annotations": annotations}


@dataclass
class StoreTruth:
    """Ground truth for :func:`coco_box_ap` built from what a val store holds: ``coco`` and ``image_ids``."""

    coco: object
    image_ids: list[int]

    @classmethod
    def from_records(cls, categories: list[dict], records: list[dict]) -> StoreTruth:
        """From every image's :func:`ground_truth` record (all ranks' records, in any order)."""
        from pycocotools.coco import COCO

        records = sorted(records, key=lambda record: record["image"]["id"])
        annotations = [annotation for record in records for annotation in record["annotations"]]
        coco = COCO()
        coco.dataset = {"images": [record["image"] for record in records], "categories": categories,
                        "annotations": [{**annotation, "id": i + 1} for i, annotation in enumerate(annotations)]}
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return cls(coco, [record["image"]["id"] for record in records])


def predict_store(model: torch.nn.Module, val: StoreValSet, device: torch.device, *, batch_size: int = 8,
                  workers: int = 0, progress: bool = True) -> tuple[list[dict], list[dict]]:
    """This reader's share of the val store in one pass: the COCO result dicts (as :func:`predict` gives)
    and the images' :func:`ground_truth` records (``gather_lists`` joins the ranks' shares)."""
    loader = DataLoader(val, batch_size=batch_size, collate_fn=collate, num_workers=workers)
    results, records = [], []
    for item, detection in detect(model, loader, device, progress=progress):
        results += coco_results(item, detection, val.view, val.category_ids)
        records.append(ground_truth(item, val.view, val.category_ids))
    return results, records


def open_val_set(data: Path | None, split: str, store: str | Path | None, view: View, category_ids: list[int], *,
                 ranks: Ranks = Ranks(), model_name: str = "the model") -> CocoDetection | StoreValSet:
    """The val set at ``view``: the store when given, else ``data``/``split``; a PkdError (one line) when
    neither is given or the val set's categories are not ``category_ids`` (the model's)."""
    if store is not None:
        val: CocoDetection | StoreValSet = StoreValSet(store, view, rank=ranks.rank, num_replicas=ranks.world_size)
        where = f"val store {store}"
    elif data is not None:
        val, where = CocoDetection(data, split, [view]), f"{data}/{split}"
    else:
        raise PkdError("evaluation needs a val set: --val-store STORE (`extract --split val --with-images`) or "
                       "--data DIR")
    if list(category_ids) != val.category_ids:
        raise PkdError(f"{model_name} was trained on categories {list(category_ids)}, the val set {where} has "
                       f"{val.category_ids}")
    return val


def box_ap(model: torch.nn.Module, val: CocoDetection | StoreValSet, device: torch.device, *, batch_size: int = 8,
           workers: int = 0, progress: bool = False, ranks: Ranks = Ranks()) -> dict[str, float] | None:
    """Box AP (0..1) of ``model`` on ``val``, predicted split over ranks and gathered; the stats on rank 0,
    None on the other ranks."""
    if isinstance(val, CocoDetection):
        results = predict(model, val, device, batch_size=batch_size, workers=workers, progress=progress, ranks=ranks)
        truth = val
    else:
        results, records = predict_store(model, val, device, batch_size=batch_size, workers=workers,
                                         progress=progress)
        records = gather_lists(records, ranks)
        truth = StoreTruth.from_records(val.categories, records) if ranks.is_main else None
    results = gather_lists(results, ranks)
    return coco_box_ap(truth, results) if ranks.is_main else None


def evaluate(cfg: EvalConfig) -> dict[str, float]:
    """Box AP (0..1) ``mAP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl`` on ``cfg.store`` if set, else on
    ``cfg.data``/``cfg.split``; written to ``cfg.out`` if set."""
    check_config(cfg)
    device = resolve_device(cfg.device)
    model, content = load_detector(cfg.checkpoint)
    view = View.from_dict(content["views"][0])
    val = open_val_set(cfg.data, cfg.split, cfg.store, view, content["category_ids"], model_name=str(cfg.checkpoint))
    model.to(device)
    stats = box_ap(model, val, device, batch_size=cfg.batch_size, workers=cfg.workers, progress=cfg.progress)
    if cfg.out is not None:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(stats, indent=2) + "\n")
    return stats
