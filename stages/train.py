"""Stage two: train a detector, plain, against a feature store (offline PKD) or a live teacher (online PKD)."""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from pkd_offline.checkpoint import load_checkpoint, save_checkpoint
from pkd_offline.config import ON_ERROR, WEIGHTS_HELP, check_choices, check_config, setting, to_plain
from pkd_offline.data import IMAGE_DECODES, CocoDetection, ViewSampler, collate
from pkd_offline.distributed import Ranks, barrier, gather_lists, init_ranks, resolve_device
from pkd_offline.engine import LEVEL_LOSSES, Distillation, LoopState, lr_factor, train_steps
from pkd_offline.errors import PkdError
from pkd_offline.evaluate import coco_box_ap, predict
from pkd_offline.levels import LEVEL_MAPS, pair_levels
from pkd_offline.models import DETECTORS, USES_MASKS, VARIANTS, FeatureDetector, build_detector
from pkd_offline.models.backbones import BACKBONE_NAMES
from pkd_offline.teachers import load_teacher
from pkd_offline.views import make_views

if TYPE_CHECKING:
    from pkd_offline.store_data import StoreImages
    from pkd_offline.views import View
    from stages.evaluate import StoreValSet


def _sgd(parameters: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


def _adamw(parameters: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)


OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter], TrainConfig], torch.optim.Optimizer]] = {
    "sgd": _sgd, "adamw": _adamw}
SCHEDULES = ("cosine", "step")
"""The learning-rate schedules after warm-up (``pkd_offline.engine.lr_factor``)."""


@dataclass
class TrainConfig:
    """Everything one training run needs; pixel sizes in px, ``alpha`` per distilled level."""

    student: str = setting("retinanet", help="detector to train (any model name, teachers too)",
                           choices=lambda: tuple(DETECTORS), noun="model")
    data: Path | None = setting(None, help="data directory (images and annotations/instances_SPLIT.json); unset: "
                                           "train from --features alone (a WebDataset store written --with-images)")
    out: Path = setting(Path("runs/student"), help="run directory: model.pt, last.pt, log.jsonl, eval.jsonl")
    split: str = setting("train", help="split of --data to train on")
    val_split: str | None = setting("val", help="split of --data evaluated with --eval-every")
    val_store: str | None = setting(None, help="with --eval-every: read the val set from this store (path or URL) "
                                               "written by `extract --split val --with-images`, not from --data")
    backbone: str | None = setting(None, help="the student's CNN backbone (unset: resnet50; teachers keep their own)",
                                   choices=lambda: BACKBONE_NAMES, noun="backbone")
    backbone_weights: Path | None = setting(None, help="ImageNet weights of the backbone (a torchvision "
                                                       f"classification state dict): {WEIGHTS_HELP}")
    anchor_scale: float | None = setting(None, help="RetinaNet anchor side / stride at the first octave (unset: "
                                                    "4 full, 2 tiny)")
    head_norm: str | None = setting(None, help="RetinaNet head normalisation: unset torchvision's v1 head, gn "
                                               "GroupNorm (v2)", choices=("gn",), noun="head norm")
    variant: str = setting("full", help="model size: full, or tiny for CPU runs and tests",
                           choices=lambda: VARIANTS, noun="variant")
    epochs: int = setting(12, help="passes over the training set (unless --iters is set)")
    iters: int | None = setting(None, help="optimiser steps in all (unset: --epochs passes)")
    stop_after: int | None = setting(None, help="end this session after N steps; --resume continues on the same "
                                                "schedule")
    batch_size: int = setting(8, help="images per step (per rank under torchrun)")
    optimizer: str = setting("sgd", help="optimiser (sgd: momentum 0.9)", choices=lambda: tuple(OPTIMIZERS),
                             noun="optimizer")
    lr: float = setting(0.01, help="peak learning rate")
    weight_decay: float = setting(1e-4, help="weight decay")
    warmup_iters: int = setting(100, help="linear warm-up steps (at most a quarter of the run)")
    schedule: str = setting("cosine", help="learning rate after warm-up: cosine to 0, or step (x0.1 at 2/3 and 8/9)",
                            choices=SCHEDULES, noun="schedule")
    short_side: int = setting(800, help="resize: the image's short side, px")
    max_size: int = setting(1333, help="resize: the long side at most, px")
    size_divisor: int = setting(32, help="batches padded to a multiple of this, px")
    views: int = setting(2, help="views per image (resize and flip) without --features (a store brings its own)")
    workers: int = setting(2, help="DataLoader worker processes")
    image_decode: str = setting("workers", help="where JPEG images are decoded and their views replayed: workers "
                                                "(the DataLoader processes) or device (the step, on --device, "
                                                "batched with torchvision's decode_jpeg: nvJPEG on CUDA); needs --data",
                                choices=IMAGE_DECODES, noun="image decode")
    device: str = setting("cpu", help="torch device, e.g. cpu, cuda, cuda:1 (under torchrun: each rank's own GPU)")
    seed: int = setting(0, help="seed of the model's initialisation and the data order")
    resume: bool = setting(False, help="continue from OUT/last.pt")
    checkpoint_every: int = setting(200, help="write OUT/last.pt every N steps")
    eval_every: int = setting(0, help="evaluate on the val set every N steps into OUT/eval.jsonl (0: never)")
    features: str | Path | None = setting(None, help="feature store path or fsspec URL (s3://bucket/f.zarr): "
                                                     "offline PKD")
    teacher: str | None = setting(None, help="teacher model name: online PKD (with --checkpoint)",
                                  choices=lambda: tuple(DETECTORS), noun="teacher")
    teacher_checkpoint: Path | None = setting(None, help=f"the online teacher's weights: {WEIGHTS_HELP}",
                                              flag="--checkpoint")
    online_per_image: bool = setting(False, help="run the online teacher per image at its own padded size "
                                                 "(offline's maps)")
    random_init: bool = setting(False, help="random online-teacher weights (seeded): smoke tests only")
    alpha: float = setting(6.0, help="PKD loss weight per distilled level")
    loss: str = setting("pcc", help="feature imitation loss per distilled level: pcc (PKD, the Pearson correlation) "
                                    "or mse (plain mean squared error over the valid region, the paper's comparison)",
                        choices=lambda: tuple(LEVEL_LOSSES), noun="imitation loss")
    level_map: str = setting("stride", help="pairing of student and teacher levels: index (in order) or stride "
                                            "(equal strides)", choices=LEVEL_MAPS, noun="level map")
    max_pairs: int = setting(4, help="distil at most this many level pairs (the finest)")
    on_error: str = setting("stop", help="a damaged store sample: stop, or skip it and count it",
                            choices=ON_ERROR)
    progress: bool = setting(True, help="no progress bars")

    def validate(self) -> None:
        """PkdError (one line) for a name outside a setting's choices or settings that do not go together."""
        check_choices(self)
        if self.online_per_image and self.teacher is None:
            raise PkdError("--online-per-image needs --teacher NAME (online PKD)")
        if self.features is not None and self.teacher is not None:
            raise PkdError("pass either --features STORE (offline) or --teacher NAME (online), not both")
        if self.data is None and self.features is None:
            raise PkdError("--data DIR is needed (or --features STORE written by `extract --with-images`, to train "
                           "from the store alone)")
        if self.data is None and self.image_decode == "device":
            raise PkdError("--image-decode device reads JPEG files from --data; a store's own images are decoded in "
                           "the workers: pass --data DIR or --image-decode workers")
        if self.data is None and self.eval_every and self.val_split and self.val_store is None:
            raise PkdError("--eval-every reads a val set: pass --val-store STORE (written by `extract --split val "
                           "--with-images`) or --data DIR")


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``cfg.optimizer`` (a name of ``OPTIMIZERS``) over the model's trainable parameters."""
    return OPTIMIZERS[cfg.optimizer]([p for p in model.parameters() if p.requires_grad], cfg)


def run_views(cfg: TrainConfig) -> list[View]:
    """The views training replays: the store's (``cfg.features``), else ``cfg.views`` made from the resize settings."""
    views = make_views(cfg.views, cfg.short_side, cfg.max_size, cfg.size_divisor)
    if cfg.features is not None:
        from pkd_offline.store_data import store_views

        views = store_views(cfg.features)
    return views


def training_data(cfg: TrainConfig, views: list[View]) -> CocoDetection | StoreImages:
    """The training data set: the data directory ``cfg.data``, or without it the store ``cfg.features`` alone
    (:class:`pkd_offline.store_data.StoreImages`; one-line PkdError when the store cannot feed training by itself)."""
    if cfg.data is not None:
        return CocoDetection(cfg.data, cfg.split, views, with_masks=cfg.student in USES_MASKS,
                             image_decode=cfg.image_decode)
    from pkd_offline.store_data import store_dataset

    return store_dataset(cfg.features, views, cfg.student)


def build_student(cfg: TrainConfig, num_classes: int) -> FeatureDetector:
    """The student ``cfg.student`` with random weights, its backbone loaded from ``cfg.backbone_weights`` if set."""
    model = build_detector(cfg.student, num_classes=num_classes, variant=cfg.variant, backbone=cfg.backbone,
                           anchor_scale=cfg.anchor_scale, head_norm=cfg.head_norm)
    if cfg.backbone_weights is not None:
        from pkd_offline.models.foreign_weights import load_backbone_weights

        load_backbone_weights(model, cfg.backbone_weights)
    return model


def setup_distillation(cfg: TrainConfig, dataset: CocoDetection | StoreImages, model: FeatureDetector,
                       device: torch.device, ranks: Ranks):
    """The training dataset (joined with the store when offline) and the Distillation, or None for plain runs.
    Offline, the images the store skipped are dropped from ``dataset``."""
    if cfg.features is not None:
        from pkd_offline.store_data import StoreJoinedDataset, StoreStream
        from pkd_offline.store_fit import check_layout_fits, check_store_fits, drop_images_the_store_skipped

        store = check_store_fits(cfg.features, dataset, model)
        if isinstance(dataset, CocoDetection):
            drop_images_the_store_skipped(dataset, store.manifest)
        # On a GPU the maps travel as stored (fewer bytes from the workers than float32) and are decoded
        # there; on a CPU the workers decode, in parallel with the step.
        on_gpu = device.type == "cuda"
        teacher_strides = [level.stride for level in store.manifest.levels]
        pairs = pair_levels(list(model.strides), teacher_strides, cfg.level_map)[: cfg.max_pairs]
        check_layout_fits(store.manifest, pairs, cfg.level_map, cfg.size_divisor)
        if store.manifest.format == "wds":
            stream = StoreStream(dataset, cfg.features, seed=cfg.seed, rank=ranks.rank, num_replicas=ranks.world_size,
                                 skip_damaged=cfg.on_error == "skip", keep_encoded=on_gpu)
            return stream, Distillation(pairs, cfg.alpha, loss=cfg.loss)
        joined = StoreJoinedDataset(dataset, cfg.features, skip_damaged=cfg.on_error == "skip", keep_encoded=on_gpu)
        return joined, Distillation(pairs, cfg.alpha, loss=cfg.loss)
    if cfg.teacher is not None:
        teacher, _ = load_teacher(cfg.teacher, checkpoint=cfg.teacher_checkpoint, random_init=cfg.random_init,
                                  variant=cfg.variant, num_classes=dataset.num_classes, seed=cfg.seed)
        if teacher.channels != model.channels:
            raise PkdError(f"teacher FPN has {teacher.channels} channels, student {model.channels}: use the same --variant")
        pairs = pair_levels(list(model.strides), list(teacher.strides), cfg.level_map)[: cfg.max_pairs]
        return dataset, Distillation(pairs, cfg.alpha, teacher.to(device), per_image=cfg.online_per_image,
                                     loss=cfg.loss)
    return dataset, None


def training_loader(cfg: TrainConfig, train_set, n_views: int, ranks: Ranks, device: torch.device):
    """The DataLoader and what orders its epochs: a :class:`ViewSampler` (map-style data, this rank's share) or
    the streaming dataset itself."""
    streaming = isinstance(train_set, torch.utils.data.IterableDataset)
    sampler = train_set if streaming else ViewSampler(len(train_set), n_views, seed=cfg.seed, rank=ranks.rank,
                                                      num_replicas=ranks.world_size)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=None if streaming else sampler, collate_fn=collate,
                        num_workers=cfg.workers, persistent_workers=False, drop_last=False,
                        pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed))  # leaves the global RNG to the model
    return loader, sampler


class TrainingRun:
    """One training session's state: the model and its optimiser and schedule, the loop position, the val set,
    and the files under ``cfg.out``. :meth:`after_step` evaluates and checkpoints on the configured iterations
    (and the last); rank 0 alone writes files."""

    def __init__(self, cfg: TrainConfig, model: FeatureDetector, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, *, total_iters: int, views: list[View],
                 category_ids: list[int], distill: Distillation | None, ranks: Ranks, device: torch.device) -> None:
        self.cfg, self.model, self.optimizer, self.scheduler = cfg, model, optimizer, scheduler
        self.total_iters, self.views, self.category_ids, self.distill = total_iters, views, category_ids, distill
        self.ranks, self.device = ranks, device
        self.out = Path(cfg.out)
        self.last_path, self.log_path, self.eval_path = self.out / "last.pt", self.out / "log.jsonl", self.out / "eval.jsonl"
        self.state = LoopState()
        self.val_set: CocoDetection | StoreValSet | None = None

    def start(self) -> None:
        """Restore ``last.pt`` under ``cfg.resume`` (logs cut back to its iteration), else clear a previous run's
        files; then open the val set when ``cfg.eval_every`` is set."""
        if self.cfg.resume and self.last_path.exists():
            self.state = restore(self.last_path, self.model, self.optimizer, self.scheduler)
            if self.ranks.is_main:
                truncate_log(self.log_path, self.state.iteration)
                truncate_log(self.eval_path, self.state.iteration)
        elif self.ranks.is_main:  # a fresh start (also --resume before the first checkpoint): no stale lines
            for stale in (self.log_path, self.eval_path, self.last_path, self.out / "skipped.json"):
                stale.unlink(missing_ok=True)
        barrier(self.ranks)
        cfg = self.cfg
        if cfg.eval_every and (cfg.val_split or cfg.val_store):
            from stages.evaluate import open_val_set

            self.val_set = open_val_set(cfg.data, cfg.val_split, cfg.val_store, self.views[0], self.category_ids,
                                        ranks=self.ranks)

    def meta(self) -> dict:
        """What rebuilds the model and says how it was trained (every checkpoint holds it)."""
        return {"spec": self.model.spec, "category_ids": self.category_ids, "views": [v.to_dict() for v in self.views],
                "config": to_plain(self.cfg),
                "distill_pairs": [list(p) for p in self.distill.pairs] if self.distill else []}

    def checkpoint_content(self) -> dict:
        """``last.pt``: the meta, the model, optimiser, schedule, loop position and the torch RNG state."""
        return {**self.meta(), "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "iteration": self.state.iteration,
                "epoch": self.state.epoch, "step_in_epoch": self.state.step_in_epoch,
                "torch_rng": torch.get_rng_state()}

    def after_step(self, state: LoopState) -> None:
        """Evaluate every ``eval_every`` and checkpoint every ``checkpoint_every`` iterations, and after the last."""
        done = state.iteration >= self.total_iters
        if self.val_set is not None and (state.iteration % self.cfg.eval_every == 0 or done):
            self.evaluate(state.iteration)
        if self.ranks.is_main and (state.iteration % self.cfg.checkpoint_every == 0 or done):
            save_checkpoint(self.last_path, self.checkpoint_content())

    def evaluate(self, iteration: int) -> None:
        """Box AP on the val set, split over ranks, appended to ``eval.jsonl`` by rank 0."""
        from stages.evaluate import box_ap

        if self.ranks.distributed:  # every rank evaluates rank 0's model (batch-norm statistics differ per rank)
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        if isinstance(self.val_set, CocoDetection):
            predictions = predict(self.model, self.val_set, self.device, progress=False, ranks=self.ranks)
            results = gather_lists(predictions, self.ranks)
            stats = coco_box_ap(self.val_set, results) if self.ranks.is_main else None
        else:  # a val store: one pass, its ground truth gathered with the results
            stats = box_ap(self.model, self.val_set, self.device, ranks=self.ranks)
        if self.ranks.is_main:
            with open(self.eval_path, "a") as handle:
                handle.write(json.dumps({"iter": iteration, **stats}) + "\n")

    def finish(self) -> Path:
        """List the skipped samples, write ``model.pt`` when the schedule is done (else ``last.pt``); its path."""
        if self.state.skipped and self.ranks.is_main:
            skipped_path = self.out / "skipped.json"
            skipped_path.write_text(json.dumps(self.state.skipped, indent=1) + "\n")
            print(f"pkd-offline: skipped {len(self.state.skipped)} damaged samples (listed in {skipped_path})",
                  file=sys.stderr)
        finished = self.state.iteration >= self.total_iters
        path = self.out / "model.pt" if finished else self.last_path
        if self.ranks.is_main:
            save_checkpoint(path, {**self.meta(), "model": self.model.state_dict()} if finished
                            else self.checkpoint_content())
        barrier(self.ranks)
        return path


def train(cfg: TrainConfig) -> Path:
    """Train ``cfg.student`` on ``cfg.data``/``cfg.split`` (without ``cfg.data``: on the images and targets
    of the WebDataset store ``cfg.features``); writes ``out/model.pt``, ``out/log.jsonl`` (one line per
    step) and, with ``eval_every``, ``out/eval.jsonl`` (the val set: the store ``cfg.val_store`` if set, else
    ``cfg.data``/``cfg.val_split``). Returns the model.pt path (``last.pt`` when ``stop_after`` ended it early).

    Under torchrun: DistributedDataParallel, each rank a disjoint part of every epoch (the batch
    size is per rank), logs and checkpoints from rank 0, evaluation split over ranks and gathered.
    """
    check_config(cfg)
    ranks = init_ranks(torch.device(cfg.device.split(":")[0]))
    device = resolve_device(cfg.device, ranks)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    views = run_views(cfg)
    dataset = training_data(cfg, views)
    model = build_student(cfg, dataset.num_classes)
    train_set, distill = setup_distillation(cfg, dataset, model, device, ranks)
    model.to(device)
    loader, sampler = training_loader(cfg, train_set, len(views), ranks, device)
    total_iters = cfg.iters if cfg.iters is not None else cfg.epochs * -(-len(sampler) // cfg.batch_size)
    trained = model
    if ranks.distributed:
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i, total_iters, min(cfg.warmup_iters, total_iters // 4), cfg.schedule))
    run = TrainingRun(cfg, model, optimizer, scheduler, total_iters=total_iters, views=views,
                      category_ids=dataset.category_ids, distill=distill, ranks=ranks, device=device)
    run.start()
    # --stop-after ends this session early (a time-limited job); --resume continues on the same schedule.
    stop_at = total_iters if cfg.stop_after is None else min(total_iters, run.state.iteration + cfg.stop_after)
    train_steps(trained, loader, sampler, optimizer, scheduler, run.state, stop_at, device=device, distill=distill,
                size_divisor=cfg.size_divisor, log_path=run.log_path if ranks.is_main else Path(os.devnull),
                on_step=run.after_step, progress=cfg.progress and ranks.is_main)
    return run.finish()


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
