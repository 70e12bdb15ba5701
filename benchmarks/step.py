"""The training step, timed part by part, for the student alone, offline PKD (one run per store) and online PKD.

Each mode is built as ``stages.train`` builds it (``setup_distillation``, the training loader), its own student,
optimiser and loader, all resident at once; the modes run interleaved in blocks (``timing.interleaved_blocks``).
One step is ``pkd_offline.engine.training_step`` split at its seams, with a clock mark after each part:

- ``loader``: waiting for the next batch from the DataLoader;
- ``copy``: images and targets to the device;
- ``student_forward``: the detector's forward and detection losses (bf16 autocast on CUDA, as training);
- ``decode`` (offline): the stored maps stacked per level, copied to the device as the store holds them and decoded
  there (projected levels: their statistics), as ``engine.distillation_loss`` does it;
  ``teacher`` (online): the teacher's forward on the batch;
- ``pkd_forward``: the PKD loss from the student's maps and the teacher's;
- ``pkd_backward``: the PKD loss's gradient with respect to the student's maps (read through detached copies),
  its own gradient pass;
- ``backward_and_update``: the detection loss's and that gradient's backward through the student, gradient
  clipping and the optimiser step (one ``backward`` with both, the same gradients as ``loss.backward()``).

Ratios are of medians over blocks (each block summarised by its median step), with a 95% bootstrap interval
over blocks (``timing.bootstrap_ratio_ci``).
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from benchmarks.timing import Clock, block_medians, bootstrap_ratio_ci, interleaved_blocks, part_medians, \
    ratio_of_medians
from pkd_offline.data import CocoDetection, ViewSampler, collate
from pkd_offline.device_codecs import EncodedMap, dense_map
from pkd_offline.device_images import decode_on
from pkd_offline.distributed import Ranks
from pkd_offline.engine import Distillation, distillation_targets, distillation_term
from pkd_offline.models import build_detector
from pkd_offline.precision import forward_autocast
from pkd_offline.store_data import store_views
from stages.train import TrainConfig, build_optimizer, setup_distillation


@dataclass
class ModeRun:
    """One mode's student, endless batches, optimiser and Distillation (None: the student alone)."""

    model: torch.nn.Module
    batches: Iterator[list[dict]]
    optimizer: torch.optim.Optimizer
    distill: Distillation | None
    device: torch.device
    size_divisor: int
    losses: list[float] = field(default_factory=list)


def batches_forever(loader: DataLoader, sampler) -> Iterator[list[dict]]:
    """The loader's batches epoch after epoch (``sampler.set_epoch`` before each)."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def build_mode(cfg: TrainConfig, views_store: Path | str) -> ModeRun:
    """A mode as ``stages.train.train`` builds it: dataset replaying ``views_store``'s views, the student,
    ``setup_distillation`` (store joined, maps kept encoded on CUDA; or the online teacher), the loader with
    persistent workers (pinned on CUDA) and the optimiser."""
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    dataset = CocoDetection(cfg.data, cfg.split, store_views(views_store), image_decode=cfg.image_decode)
    model = build_detector(cfg.student, num_classes=dataset.num_classes, variant=cfg.variant, backbone=cfg.backbone)
    source, distill = setup_distillation(cfg, dataset, model, device, Ranks())
    model.to(device)
    streaming = isinstance(source, IterableDataset)
    sampler = source if streaming else ViewSampler(len(dataset), len(dataset.views), seed=cfg.seed)
    loader = DataLoader(source, batch_size=cfg.batch_size, sampler=None if streaming else sampler,
                        collate_fn=collate, num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed))
    return ModeRun(model, batches_forever(loader, sampler), build_optimizer(cfg, model), distill, device,
                   cfg.size_divisor)


def timed_step(run: ModeRun, clock: Clock, device_waits: list[str] | None = None) -> dict[str, float]:
    """One training step of ``run`` (the same update as ``engine.training_step``), returning its parts in ms and,
    for a distilled mode, ``pkd_host``: the host's own ms in the PKD path (targets, term and their gradient pass,
    from the first call to the last return; on CUDA the launching, which the device's time runs behind; not part
    of ``step``). With ``device_waits`` (a list) on CUDA, the PKD path runs under
    ``torch.cuda.set_sync_debug_mode("warn")`` and each place it waited for the device is appended."""
    model, device, distill = run.model, run.device, run.distill
    autocast = functools.partial(forward_autocast, device)  # the one policy (bf16 on CUDA), as training_step runs
    model.train()
    clock.start()
    batch = next(run.batches)
    clock.mark("loader")
    batch = decode_on(batch, device)  # where the workers hand on JPEG bytes (--image-decode device)
    clock.mark("image_decode")
    images = [item["image"].to(device, non_blocking=True) for item in batch]
    targets = [{k: v.to(device) for k, v in item["target"].items()} for item in batch]
    clock.mark("copy")
    with autocast():
        losses, student_features = model(images, targets)
        loss_det = sum(losses.values())
    clock.mark("student_forward")
    optimizer = run.optimizer
    optimizer.zero_grad(set_to_none=True)
    if distill is None:
        loss_det.backward()
        loss = loss_det
    else:
        # The PKD loss reads the student's maps through detached copies, so its gradient pass stops at the maps
        # (a map computed from another, P6 from P5, would otherwise carry its share twice).
        maps = {s: student_features[s].detach().requires_grad_(True) for s in dict.fromkeys(s for s, _ in distill.pairs)}
        student = {t: maps[s] for s, t in distill.pairs}
        host = time.perf_counter()
        with autocast(), sync_debug(device, device_waits):
            targets = distillation_targets(student, batch, images, distill, run.size_divisor, device)
            clock.mark("decode" if distill.teacher is None else "teacher")
            loss_pkd = distillation_term(student, targets, distill)
            clock.mark("pkd_forward")
            grads = torch.autograd.grad(loss_pkd, list(maps.values()))
        host = 1000 * (time.perf_counter() - host)
        clock.mark("pkd_backward")
        torch.autograd.backward([loss_det, *(student_features[s] for s in maps)], [None, *grads])
        loss = loss_det + loss_pkd.detach()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    optimizer.step()
    clock.mark("backward_and_update")
    parts = clock.parts()
    if distill is not None:
        parts["pkd_host"] = host
    run.losses.append(float(loss.detach()))
    return parts


@contextlib.contextmanager
def sync_debug(device: torch.device, waits: list[str] | None):
    """On CUDA with ``waits`` a list: torch's sync debug mode "warn" inside, each warning's message (where the host
    waited for the device) appended to ``waits``; else nothing."""
    if waits is None or device.type != "cuda":
        yield
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)
    waits.extend(str(warning.message).splitlines()[0] for warning in caught)


def ratio_with_ci(numerator: list[float], denominator: list[float]) -> tuple[float, list[float]]:
    """(ratio of medians, its 95% bootstrap interval [low, high]) of per-block values."""
    return ratio_of_medians(numerator, denominator), list(bootstrap_ratio_ci(numerator, denominator))


def step_ratios(timed: dict[str, list[list[dict[str, float]]]]) -> dict:
    """The step's ratios from ``interleaved_blocks``' timings of modes ``alone``, ``offline_<format>`` and
    ``online``: ``step_ratio_offline_<format>_over_alone`` each, ``step_ratio_offline_over_alone`` (the worse
    format), ``step_ratio_online_over_alone`` and ``offline_over_online`` (the worse format), each beside its
    ``..._ci95`` [low, high]; ``step_ratio_offline_over_alone_per_format`` {format: ratio}."""
    blocks = {mode: block_medians(values) for mode, values in timed.items()}
    figures: dict = {}
    per_format = {}
    for mode in [m for m in blocks if m.startswith("offline_")]:
        ratio, ci = ratio_with_ci(blocks[mode], blocks["alone"])
        figures[f"step_ratio_{mode}_over_alone"], figures[f"step_ratio_{mode}_over_alone_ci95"] = ratio, ci
        per_format[mode.removeprefix("offline_")] = ratio
    if per_format:
        worse = "offline_" + max(per_format, key=per_format.get)
        figures["step_ratio_offline_over_alone"] = figures[f"step_ratio_{worse}_over_alone"]
        figures["step_ratio_offline_over_alone_ci95"] = figures[f"step_ratio_{worse}_over_alone_ci95"]
        figures["step_ratio_offline_over_alone_per_format"] = per_format
        figures["offline_worse_format"] = worse.removeprefix("offline_")
    if "online" in blocks:
        figures["step_ratio_online_over_alone"], figures["step_ratio_online_over_alone_ci95"] = ratio_with_ci(
            blocks["online"], blocks["alone"])
        if per_format:
            figures["offline_over_online"], figures["offline_over_online_ci95"] = ratio_with_ci(
                blocks[worse], blocks["online"])
    figures["ratio_statistic"] = "ratio of medians of per-block median steps; 95% percentile bootstrap over blocks"
    return figures


def step_benchmark(configs: dict[str, TrainConfig], views_store: Path | str, *, blocks: int, steps_per_block: int,
                   warmup: int) -> dict:
    """Build every mode of ``configs`` ({mode: TrainConfig}; ``alone`` among them), warm each up (``warmup``
    untimed steps, its peak device memory measured then), run them interleaved in ``blocks`` blocks of
    ``steps_per_block`` timed steps, and return the ratios (``step_ratios``), ``step_breakdown_ms`` {mode:
    {part: median ms}} (``pkd_host``: the PKD path's host ms, see ``timed_step``), ``step_seconds`` {mode: median
    s}, ``pkd_path_device_waits`` (CUDA: {distilled mode: {where the PKD path waited for the device: count}} over
    one step, {} each where it never waits; None off CUDA), ``peak_gpu_memory_gb`` {mode: GB the mode added, or
    None off CUDA}, ``last_step_loss`` and the sizes run."""
    device = torch.device(next(iter(configs.values())).device)
    clock = Clock(device)
    runs, memory = {}, {}
    for mode, cfg in configs.items():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        runs[mode] = build_mode(cfg, views_store)
        for _ in range(warmup):
            timed_step(runs[mode], clock)
        memory[mode] = (torch.cuda.max_memory_allocated(device) - before) / 1e9 if device.type == "cuda" else None
    timed = interleaved_blocks({mode: functools.partial(timed_step, run, clock) for mode, run in runs.items()},
                               blocks=blocks, steps_per_block=steps_per_block)
    breakdown = {mode: part_medians(values) for mode, values in timed.items()}
    waits = {}
    if device.type == "cuda":  # one more step of each distilled mode, the PKD path under the sync debug mode
        for mode, run in runs.items():
            if run.distill is not None:
                messages: list[str] = []
                timed_step(run, clock, device_waits=messages)
                waits[mode] = dict(Counter(messages))
    return {**step_ratios(timed), "step_breakdown_ms": breakdown, "pkd_path_device_waits": waits or None,
            "step_seconds": {mode: parts["step"] / 1000 for mode, parts in breakdown.items()},
            "peak_gpu_memory_gb": memory, "last_step_loss": {mode: run.losses[-1] for mode, run in runs.items()},
            "step_timing": {"blocks": blocks, "steps_per_block": steps_per_block, "warmup": warmup,
                            "clock": "cuda events" if device.type == "cuda" else "perf_counter"}}


def loader_rate(cfg: TrainConfig, views_store: Path | str, samples: int) -> float:
    """Samples/s the training loader of ``cfg`` (``build_mode``'s) delivers, images decoded and teacher maps as
    training gets them, clocked from its first batch until ``samples`` more have come (worker start-up is not
    the rate)."""
    run = build_mode(cfg, views_store)
    next(run.batches)
    tick, count = time.perf_counter(), 0
    while count < samples:
        count += len(next(run.batches))
    return count / (time.perf_counter() - tick)
