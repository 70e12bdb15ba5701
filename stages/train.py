"""Stage two: train a detector, plain, against a feature store (offline PKD) or a live teacher (online PKD)."""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from pkd_offline.checkpoint import load_checkpoint, save_checkpoint
from pkd_offline.config import to_plain
from pkd_offline.data import CocoDetection, ViewSampler, collate
from pkd_offline.distributed import Ranks, barrier, gather_lists, init_ranks, resolve_device
from pkd_offline.engine import Distillation, LoopState, lr_factor, train_steps
from pkd_offline.errors import PkdError
from pkd_offline.evaluate import coco_box_ap, predict
from pkd_offline.levels import pair_levels
from pkd_offline.models import USES_MASKS, build_detector
from pkd_offline.views import make_views
from stages.teachers import load_teacher

if TYPE_CHECKING:
    from pkd_offline.views import View
    from stages.store_data import StoreImages


@dataclass
class TrainConfig:
    """Everything one training run needs; pixel sizes in px, ``alpha`` per distilled level."""

    student: str = "retinanet"
    data: Path | None = None  # None: train from --features alone (a WebDataset store written --with-images)
    out: Path = Path("runs/student")
    split: str = "train"
    val_split: str | None = "val"
    val_store: str | None = None  # a val store (extract --split val --with-images), path or URL: read instead of data
    backbone: str | None = None
    backbone_weights: Path | None = None
    anchor_scale: float | None = None  # RetinaNet anchor side / stride (None: the variant's default)
    head_norm: str | None = None  # RetinaNet head normalisation: None (torchvision v1) or "gn" (v2)
    variant: str = "full"
    epochs: int = 12
    iters: int | None = None
    stop_after: int | None = None
    batch_size: int = 8
    optimizer: str = "sgd"
    lr: float = 0.01
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    schedule: str = "cosine"
    short_side: int = 800
    max_size: int = 1333
    size_divisor: int = 32
    views: int = 2
    workers: int = 2
    device: str = "cpu"
    seed: int = 0
    resume: bool = False
    checkpoint_every: int = 200
    eval_every: int = 0
    features: str | Path | None = None  # a local store path or an fsspec URL (s3://bucket/f.zarr)
    teacher: str | None = None
    teacher_checkpoint: Path | None = None
    online_per_image: bool = False  # online teacher run per image at its own padded size (the offline control)
    random_init: bool = False
    alpha: float = 6.0
    level_map: str = "stride"
    max_pairs: int = 4
    on_error: str = "stop"
    progress: bool = True


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    parameters = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise PkdError(f"unknown optimizer {cfg.optimizer!r}: choose sgd or adamw")


def training_data(cfg: TrainConfig, views: list[View]) -> CocoDetection | StoreImages:
    """The training data set: the data directory ``cfg.data``, or without it the store ``cfg.features`` alone
    (:class:`stages.store_data.StoreImages`; one-line PkdError when the store cannot feed training by itself)."""
    if cfg.data is not None:
        return CocoDetection(cfg.data, cfg.split, views, with_masks=cfg.student in USES_MASKS)
    if cfg.features is None:
        raise PkdError("--data DIR is needed (or --features STORE written by `extract --with-images`, to train "
                       "from the store alone)")
    if cfg.eval_every and cfg.val_split and cfg.val_store is None:
        raise PkdError("--eval-every reads a val set: pass --val-store STORE (written by `extract --split val "
                       "--with-images`) or --data DIR")
    from stages.store_data import store_dataset

    return store_dataset(cfg.features, views, cfg.student)


def setup_distillation(cfg: TrainConfig, dataset: CocoDetection, model, device: torch.device, ranks: Ranks):
    """The training dataset (joined with the store when offline) and the Distillation, or None for plain runs."""
    if cfg.online_per_image and cfg.teacher is None:
        raise PkdError("--online-per-image needs --teacher NAME (online PKD)")
    if cfg.features is not None and cfg.teacher is not None:
        raise PkdError("pass either --features STORE (offline) or --teacher NAME (online), not both")
    if cfg.features is not None:
        from stages.store_data import StoreJoinedDataset, StoreStream, check_layout_fits, check_store_fits

        store = check_store_fits(cfg.features, dataset, model)
        # On a GPU the maps travel as stored (fp16/int8: 2-4x fewer bytes from the workers) and are decoded
        # there; on a CPU the workers decode, in parallel with the step.
        on_gpu = device.type == "cuda"
        teacher_strides = [level.stride for level in store.manifest.levels]
        pairs = pair_levels(list(model.strides), teacher_strides, cfg.level_map)[: cfg.max_pairs]
        check_layout_fits(store.manifest, pairs, cfg.level_map, cfg.size_divisor)
        if store.manifest.format == "wds":
            stream = StoreStream(dataset, cfg.features, seed=cfg.seed, rank=ranks.rank, num_replicas=ranks.world_size,
                                 skip_damaged=cfg.on_error == "skip", keep_encoded=on_gpu)
            return stream, Distillation(pairs, cfg.alpha)
        joined = StoreJoinedDataset(dataset, cfg.features, skip_damaged=cfg.on_error == "skip", keep_encoded=on_gpu)
        return joined, Distillation(pairs, cfg.alpha)
    if cfg.teacher is not None:
        teacher, _ = load_teacher(cfg.teacher, checkpoint=cfg.teacher_checkpoint, random_init=cfg.random_init,
                                  variant=cfg.variant, num_classes=dataset.num_classes, seed=cfg.seed)
        if teacher.channels != model.channels:
            raise PkdError(f"teacher FPN has {teacher.channels} channels, student {model.channels}: use the same --variant")
        pairs = pair_levels(list(model.strides), list(teacher.strides), cfg.level_map)[: cfg.max_pairs]
        return dataset, Distillation(pairs, cfg.alpha, teacher.to(device), per_image=cfg.online_per_image)
    return dataset, None


def train(cfg: TrainConfig) -> Path:
    """Train ``cfg.student`` on ``cfg.data``/``cfg.split`` (without ``cfg.data``: on the images and targets
    of the WebDataset store ``cfg.features``); writes ``out/model.pt``, ``out/log.jsonl`` (one line per
    step) and, with ``eval_every``, ``out/eval.jsonl`` (the val set: the store ``cfg.val_store`` if set, else
    ``cfg.data``/``cfg.val_split``). Returns the model.pt path.

    Under torchrun: DistributedDataParallel, each rank a disjoint part of every epoch (the batch
    size is per rank), logs and checkpoints from rank 0, evaluation split over ranks and gathered.
    """
    if cfg.on_error not in ("stop", "skip"):
        raise PkdError(f"--on-error must be stop or skip, got {cfg.on_error!r}")
    ranks = init_ranks(torch.device(cfg.device.split(":")[0]))
    device = resolve_device(cfg.device, ranks)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    views = make_views(cfg.views, cfg.short_side, cfg.max_size, cfg.size_divisor)
    if cfg.features is not None:
        from stages.store_data import store_views

        views = store_views(cfg.features)
    dataset = training_data(cfg, views)
    model = build_detector(cfg.student, num_classes=dataset.num_classes, variant=cfg.variant, backbone=cfg.backbone,
                           anchor_scale=cfg.anchor_scale, head_norm=cfg.head_norm)
    if cfg.backbone_weights is not None:
        from pkd_offline.models.foreign_weights import load_backbone_weights

        load_backbone_weights(model, cfg.backbone_weights)
    train_set, distill = setup_distillation(cfg, dataset, model, device, ranks)
    model.to(device)
    streaming = isinstance(train_set, torch.utils.data.IterableDataset)
    sampler = train_set if streaming else ViewSampler(len(dataset), len(views), seed=cfg.seed, rank=ranks.rank,
                                                      num_replicas=ranks.world_size)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=None if streaming else sampler, collate_fn=collate,
                        num_workers=cfg.workers, persistent_workers=False, drop_last=False,
                        pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed))  # leaves the global RNG to the model
    steps_per_epoch = -(-len(sampler) // cfg.batch_size)
    total_iters = cfg.iters if cfg.iters is not None else cfg.epochs * steps_per_epoch
    trained = model
    if ranks.distributed:
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i, total_iters, min(cfg.warmup_iters, total_iters // 4), cfg.schedule))
    state = LoopState()
    last_path, log_path = out / "last.pt", out / "log.jsonl"
    if cfg.resume and last_path.exists():
        state = restore(last_path, model, optimizer, scheduler)
        if ranks.is_main:
            truncate_log(log_path, state.iteration)
            truncate_log(out / "eval.jsonl", state.iteration)
    elif ranks.is_main:  # a fresh start (also --resume before the first checkpoint): no stale lines
        for stale in (log_path, out / "eval.jsonl", last_path, out / "skipped.json"):
            stale.unlink(missing_ok=True)
    barrier(ranks)
    val_set = None
    if cfg.eval_every and (cfg.val_split or cfg.val_store):
        from stages.evaluate import box_ap, open_val_set

        val_set = open_val_set(cfg.data, cfg.val_split, cfg.val_store, views[0], dataset.category_ids, ranks=ranks)

    def meta() -> dict:
        return {"spec": model.spec, "category_ids": dataset.category_ids, "views": [v.to_dict() for v in views],
                "config": to_plain(cfg), "distill_pairs": [list(p) for p in distill.pairs] if distill else []}

    def checkpoint_content() -> dict:
        return {**meta(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "iteration": state.iteration, "epoch": state.epoch,
                "step_in_epoch": state.step_in_epoch, "torch_rng": torch.get_rng_state()}

    def on_step(state: LoopState) -> None:
        done = state.iteration >= total_iters
        if val_set is not None and (state.iteration % cfg.eval_every == 0 or done):
            if ranks.distributed:  # every rank evaluates rank 0's model (batch-norm statistics differ per rank)
                for buffer in model.buffers():
                    torch.distributed.broadcast(buffer, src=0)
            if isinstance(val_set, CocoDetection):
                results = gather_lists(predict(model, val_set, device, progress=False, ranks=ranks), ranks)
                stats = coco_box_ap(val_set, results) if ranks.is_main else None
            else:  # a val store: one pass, its ground truth gathered with the results
                stats = box_ap(model, val_set, device, ranks=ranks)
            if ranks.is_main:
                with open(out / "eval.jsonl", "a") as handle:
                    handle.write(json.dumps({"iter": state.iteration, **stats}) + "\n")
        if ranks.is_main and (state.iteration % cfg.checkpoint_every == 0 or done):
            save_checkpoint(last_path, checkpoint_content())

    # --stop-after ends this session early (a time-limited job); --resume continues on the same schedule.
    stop_at = total_iters if cfg.stop_after is None else min(total_iters, state.iteration + cfg.stop_after)
    train_steps(trained, loader, sampler, optimizer, scheduler, state, stop_at, device=device, distill=distill,
                size_divisor=cfg.size_divisor, log_path=log_path if ranks.is_main else Path(os.devnull),
                on_step=on_step, progress=cfg.progress and ranks.is_main)
    if state.skipped and ranks.is_main:
        (out / "skipped.json").write_text(json.dumps(state.skipped, indent=1) + "\n")
        print(f"pkd-offline: skipped {len(state.skipped)} damaged samples (listed in {out / 'skipped.json'})",
              file=sys.stderr)
    finished = state.iteration >= total_iters
    path = out / "model.pt" if finished else last_path
    if ranks.is_main:
        save_checkpoint(path, {**meta(), "model": model.state_dict()} if finished else checkpoint_content())
    barrier(ranks)
    return path


def restore(path: Path, model, optimizer, scheduler) -> LoopState:
    content = load_checkpoint(path)
    model.load_state_dict(content["model"])
    optimizer.load_state_dict(content["optimizer"])
    scheduler.load_state_dict(content["scheduler"])
    torch.set_rng_state(content["torch_rng"])
    return LoopState(content["iteration"], content["epoch"], content["step_in_epoch"])


def truncate_log(path: Path, iteration: int) -> None:
    """Drop log lines past ``iteration`` (written after the checkpoint a resumed run restarts from)."""
    if path.exists():
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["iter"] <= iteration:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line torn by the kill
        path.write_text("".join(line + "\n" for line in kept))
