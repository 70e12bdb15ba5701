"""Stage one: run the teacher's backbone+FPN once over a data set and store every level, compressed.

Work is split into the store's shards (fixed ranges of samples, sample = image x view). A shard is
the unit of atomic writes and of resume: a killed run re-run with the same arguments skips the
finished shards. Within a shard, images are batched only with images of the same padded size, so
a sample's features never depend on its batch neighbours (nor on the batch size's padding).
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pkd_offline.data import CocoDetection, collate, file_sha256, read_image
from pkd_offline.distributed import barrier, init_ranks, resolve_device
from pkd_offline.errors import PkdError
from pkd_offline.graphed_forward import graphed_backbone
from pkd_offline.projection import RESIZE, project_images, projection_is_exact
from pkd_offline.pyramid import level_size
from pkd_offline.stored_maps import DEVICE_ENCODERS, check_range, device_basis
from pkd_offline.views import View, make_views, view_padded_size
from stages.teachers import load_teacher
from storage import LevelSpec, Manifest, Sample, create_store, detect_format
from storage.manifest import shard_span
from storage.codecs import EncodedLevel, needs_basis
from storage.pca_basis import (DEFAULT_STEP, SIDE_NAME, basis_from_moments, level_steps, read_side, side_bytes,
                               side_sha256)
from storage.store import existing_side


@dataclass
class ExtractConfig:
    """Stage-one settings; pixel sizes in px, ``levels`` as pyramid level numbers (P2 = stride 4)."""

    teacher: str = "swin"
    checkpoint: Path | None = None
    random_init: bool = False
    variant: str = "full"
    data: Path = Path("data/synth")
    split: str = "train"
    out: str | Path = Path("features/train.zarr")  # a local path or an fsspec URL (s3://bucket/f.zarr)
    store_format: str | None = None
    codec: str = "fp16"
    pca_step: float = DEFAULT_STEP  # the pca codec's step at the finest level, channel std units
    views: int = 1
    levels: str | None = None
    layout: str = "full"  # "projected": levels paired by index with student_levels, stored at the student's size
    student_levels: str | None = None  # the student levels a projected store serves, e.g. "3,4,5,6"
    short_side: int = 800
    max_size: int = 1333
    size_divisor: int = 32
    batch_size: int = 8
    workers: int = 2
    device: str = "cpu"
    samples_per_shard: int = 64
    on_error: str = "stop"
    with_images: bool = False
    overwrite: bool = False
    seed: int = 0
    progress: bool = True
    cuda_graphs: bool = True  # on CUDA, the teacher replayed from a graph per batch shape (GraphedForward)


def parse_levels(levels: str | None, teacher_strides: tuple[int, ...]) -> list[int]:
    """Strides (px) to keep from ``--levels`` like "2,3,4,5" (default: all of the teacher's)."""
    if levels is None:
        return list(teacher_strides)
    try:
        strides = sorted(2 ** int(level) for level in str(levels).split(","))
    except ValueError:
        raise PkdError(f"--levels {levels!r} must be comma-separated level numbers like 2,3,4,5") from None
    unknown = [s for s in strides if s not in teacher_strides]
    if unknown:
        have = ",".join(str(s.bit_length() - 1) for s in teacher_strides)
        raise PkdError(f"--levels {levels}: the teacher has levels {have} only")
    return strides


class ExtractionItems(Dataset):
    """``dataset[(image_index, view_index)]``; with ``with_images`` also ``extras``: the image file's bytes
    and ``target.json`` (boxes in the view's pixels, labels), so a WebDataset store can feed training alone."""

    def __init__(self, dataset: CocoDetection, with_images: bool) -> None:
        self.dataset, self.with_images = dataset, with_images

    def __getitem__(self, key: tuple[int, int]) -> dict:
        item = self.dataset[key]
        if self.with_images:
            target = {"boxes": item["target"]["boxes"].tolist(), "labels": item["target"]["labels"].tolist()}
            item["extras"] = {"jpg": self.dataset.image_file(item["image_id"]).read_bytes(),
                              "target.json": json.dumps(target).encode()}
        return item


def readable_images(dataset: CocoDetection, workers: int) -> tuple[list[int], list[dict]]:
    """Decode every image once (``--on-error skip``): (ids that decode, [{"image_id", "reason"}] that don't)."""
    class Probe(Dataset):
        def __len__(self) -> int:
            return len(dataset)

        def __getitem__(self, index: int):
            image_id = dataset.image_ids[index]
            try:
                read_image(dataset.image_file(image_id))
                return image_id, None
            except PkdError as error:
                return image_id, str(error)

    good, skipped = [], []
    for image_id, reason in DataLoader(Probe(), batch_size=None, num_workers=workers):
        if reason:
            skipped.append({"image_id": image_id, "reason": reason})
        else:
            good.append(image_id)
    return good, skipped


def level_specs(dataset: CocoDetection, views: list[View], strides: list[int], channels: int,
                projected: dict[int, int] | None = None) -> list[LevelSpec]:
    """Per stride, the largest map (h, w) any (image, view) gives: the zarr arrays' shape. A stride in
    ``projected`` (teacher stride -> student stride) holds the projection: the student's map plus one."""
    projected = projected or {}
    largest = (0, 0)
    for image_id in dataset.image_ids:
        for view in views:
            hw = view_padded_size(*dataset.original_hw(image_id), view)
            largest = (max(largest[0], hw[0]), max(largest[1], hw[1]))
    specs = []
    for s in strides:
        if s in projected:
            height, width = level_size(largest, projected[s])
            specs.append(LevelSpec(s, channels, height + 1, width + 1))
        else:
            specs.append(LevelSpec(s, channels, *level_size(largest, s)))
    return specs


LAYOUTS = ("full", "projected")


def store_layout(cfg: ExtractConfig, strides: list[int]) -> dict:
    """The manifest's layout: full maps, or for ``projected`` the index pairing with ``cfg.student_levels``
    and the teacher strides stored as their projection (exact 2x pairs whose student stride divides the
    padding multiple; the others keep the full map)."""
    if cfg.layout not in LAYOUTS:
        raise PkdError(f"--layout {cfg.layout!r}: choose one of {', '.join(LAYOUTS)}")
    if cfg.layout == "full":
        if cfg.student_levels is not None:
            raise PkdError("--student-levels is for --layout projected only")
        return {"name": "full"}
    if cfg.student_levels is None:
        raise PkdError("--layout projected needs --student-levels, the student levels it serves (e.g. 3,4,5,6)")
    try:
        student = sorted(2 ** int(level) for level in str(cfg.student_levels).split(","))
    except ValueError:
        raise PkdError(f"--student-levels {cfg.student_levels!r} must be comma-separated level numbers like 3,4,5,6") \
            from None
    if len(student) != len(strides):
        raise PkdError(f"--layout projected pairs levels by index: {len(strides)} teacher levels but "
                       f"{len(student)} student levels ({cfg.student_levels})")
    pairs = [[s, t] for s, t in zip(student, strides)]
    projected = [t for s, t in pairs if projection_is_exact(s, t, cfg.size_divisor)]
    if not projected:
        raise PkdError(f"--layout projected: no pair {pairs} has a student stride twice the teacher's dividing "
                       f"--size-divisor {cfg.size_divisor}; use --layout full")
    return {"name": "projected", "pairing": "index", "pairs": pairs, "projected": projected, "resize": RESIZE,
            "size_divisor": cfg.size_divisor}


def shard_batches(shards: list[range], dataset: CocoDetection, views: list[View],
                  batch_size: int) -> list[list[tuple[int, int]]]:
    """Batches of (image_index, view_index) keys: shard by shard (each a range of sample indices, sample =
    image_index * len(views) + view_index), each batch one padded size."""
    batches = []
    for shard in shards:
        groups: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
        for index in shard:
            image_index, view_index = divmod(index, len(views))
            hw = view_padded_size(*dataset.original_hw(dataset.image_ids[image_index]), views[view_index])
            groups[hw].append((image_index, view_index))
        for keys in groups.values():
            batches.extend(keys[i : i + batch_size] for i in range(0, len(keys), batch_size))
    return batches


def default_writer_threads() -> int:
    """Shards written at once: half the CPUs (the loader's workers decode images on the rest), 1 to 8."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class ShardWriterThread(threading.Thread):
    """Collects samples from a bounded queue and, once all of a shard's samples arrived, hands the shard
    to a pool of ``writers`` threads (compression releases the GIL), so encoding and writing overlap the
    next teacher forwards and each other. At most ``writers`` shards are in flight: the queue then fills
    and the forward waits, which bounds memory."""

    def __init__(self, writer, manifest: Manifest, maxsize: int = 64, writers: int = 1) -> None:
        super().__init__(daemon=True)
        self.writer, self.manifest = writer, manifest
        self.inbox: queue.Queue = queue.Queue(maxsize=maxsize)
        self.pending: dict[int, dict[int, Sample]] = defaultdict(dict)
        self.error: BaseException | None = None
        self.written = 0
        self.writers = max(1, writers)
        self.pool = ThreadPoolExecutor(self.writers, thread_name_prefix="shard-writer")
        self.in_flight: deque[Future] = deque()

    def run(self) -> None:
        while (sample := self.inbox.get()) is not None:
            if self.error is not None:
                continue
            try:
                k = sample.index // self.manifest.samples_per_shard
                self.pending[k][sample.index] = sample
                expected = self.manifest.shard_range(k)
                if len(self.pending[k]) == len(expected):
                    samples = self.pending.pop(k)
                    while len(self.in_flight) >= self.writers:
                        self._collect(self.in_flight.popleft())
                    self.in_flight.append(self.pool.submit(self.writer.write_shard, k, [samples[i] for i in expected]))
            except BaseException as error:  # surfaced in the main thread
                self.error = error
        while self.in_flight:
            self._collect(self.in_flight.popleft())
        self.pool.shutdown()

    def _collect(self, future: Future) -> None:
        try:
            future.result()
            self.written += 1
        except BaseException as error:
            self.error = self.error or error

    def put(self, sample: Sample) -> None:
        if self.error is not None:
            raise self.error
        self.inbox.put(sample)

    def close(self) -> None:
        self.inbox.put(None)
        self.join()
        if self.error is not None:
            raise self.error


# Where extraction's main loop spends its time (the second summary line on stderr): fitting a pca basis on the
# first batches (their teacher forwards included; those batches are then encoded, not run again), waiting for the
# loader's images (after the first batch), launching the teacher forward with its projections and checks, launching
# the encoding and the copy to the host, waiting for the device to finish a batch (on a GPU the next batch is
# launched first, so this is the device's time not hidden behind the host's; on the CPU the work itself is in
# teacher and encode), waiting for a free shard writer (the queue is full), and writing the last shards after the
# last batch.
EXTRACT_PHASES = ("fit", "images", "teacher", "encode", "device", "writers", "last_shards")
FIT_SAMPLES = 32  # samples (image x view) a pca basis is fitted on: the store's first, in shard order


def first_batches(batches: list[list[tuple[int, int]]], samples: int) -> list[list[tuple[int, int]]]:
    """The shortest prefix of ``batches`` holding at least ``samples`` samples (all of them if fewer)."""
    count = 0
    for i, keys in enumerate(batches):
        count += len(keys)
        if count >= samples:
            return batches[:i + 1]
    return batches


def fit_side(teacher, loader: DataLoader, strides: list[int], device: torch.device, projected: frozenset[int],
             step: float, backbone=None) -> tuple[bytes, list[tuple[list[dict], TeacherMaps]]]:
    """The pca codec's side file, per stride a basis fitted on the stored maps (projections for the projected
    strides) of ``loader``'s batches (the store's first ``FIT_SAMPLES`` samples in shard order, whatever the
    number of ranks, so a re-run fits the same basis), and those batches with their maps as ``teacher_levels``
    gave them: rank 0 encodes the ones in its own shards (all of them when shard 0 holds them, as with one rank
    or at least ``FIT_SAMPLES`` samples per shard) and never runs those twice. PkdError naming the image if any
    fitted value is NaN or Inf. ``backbone``: as ``teacher_levels``."""
    fitted, moments = [], {}  # stride -> [positions, (C,) sums, (C, C) sums of products], float64 on the device
    for batch in loader:
        maps = teacher_levels(teacher, batch, strides, device, projected, backbone)
        fitted.append((batch, maps))
        for stride in strides:
            for _, values in maps.levels[stride]:
                flat = values.double().transpose(0, 1).flatten(1)  # (C, n * h * w)
                count, total, gram = moments.get(stride, (0, 0.0, 0.0))
                moments[stride] = (count + flat.shape[1], total + flat.sum(dim=1), gram + flat @ flat.T)
    for batch, maps in fitted:
        raise_if_not_finite(batch, maps.finite.cpu(), strides)
    steps = level_steps(step, strides)
    return side_bytes({stride: basis_from_moments(count, total.cpu().numpy(), gram.cpu().numpy(), steps[stride])
                       for stride, (count, total, gram) in moments.items()}), fitted


def extract(cfg: ExtractConfig) -> Path | str:
    """Extract the teacher's FPN features of ``cfg.split`` into the store at ``cfg.out``; returns its path.

    Under torchrun each rank extracts the shards ``k % world_size == rank`` (never two writers on
    one shard); rank 0 creates the store first and writes the final manifest after all ranks finish.
    """
    ranks = init_ranks(torch.device(cfg.device.split(":")[0]))
    device = resolve_device(cfg.device, ranks)
    if cfg.on_error not in ("stop", "skip"):
        raise PkdError(f"--on-error must be stop or skip, got {cfg.on_error!r}")
    store_format = detect_format(str(cfg.out), cfg.store_format)
    views = make_views(cfg.views, cfg.short_side, cfg.max_size, cfg.size_divisor)
    dataset = CocoDetection(cfg.data, cfg.split, views)
    teacher, identity = load_teacher(cfg.teacher, checkpoint=cfg.checkpoint, random_init=cfg.random_init,
                                     variant=cfg.variant, num_classes=dataset.num_classes, seed=cfg.seed)
    teacher.to(device)
    backbone = graphed_backbone(teacher, device, cfg.cuda_graphs)  # None: the teacher's own, launched per kernel
    if ranks.is_main:  # an MMDetection Swin teacher differs from MMDetection's own on small inputs: say so, once
        from pkd_offline.models.swin_window import warn_small_inputs
        warn_small_inputs(identity, [view_padded_size(*dataset.original_hw(i), view)
                                     for i in dataset.image_ids for view in views])
    strides = parse_levels(cfg.levels, teacher.strides)
    layout = store_layout(cfg, strides)
    projected = {t: s for s, t in layout.get("pairs", []) if t in layout.get("projected", [])}
    skipped: list[dict] = []
    if cfg.on_error == "skip":
        good, skipped = readable_images(dataset, cfg.workers)
        dataset.image_ids = good
    levels = level_specs(dataset, views, strides, teacher.channels, projected)

    def make_manifest(codec_side: dict | None) -> Manifest:
        return Manifest(
            format=store_format, teacher=identity, normalization=teacher.transform.normalization(),
            levels=levels, codec=cfg.codec, layout=layout,
            views=[v.to_dict() for v in views],
            dataset={"annotation_sha256": file_sha256(dataset.annotation_file), "split": cfg.split,
                     "annotation_file": dataset.annotation_file.name, "image_ids": dataset.image_ids},
            samples_per_shard=cfg.samples_per_shard, skipped=skipped, codec_side=codec_side,
            categories=[{"id": c, "name": str(dataset.coco.cats[c].get("name", c))} for c in dataset.category_ids])

    def side_record(side: bytes | None) -> dict | None:
        return None if side is None else {"file": SIDE_NAME, "sha256": side_sha256(side), "step": float(cfg.pca_step)}

    n_samples = len(dataset.image_ids) * len(views)
    n_shards = -(-n_samples // cfg.samples_per_shard)

    def plan(shards) -> list[list[tuple[int, int]]]:
        return shard_batches([shard_span(k, cfg.samples_per_shard, n_samples) for k in shards], dataset, views,
                             cfg.batch_size)

    def loader_of(batches: list[list[tuple[int, int]]]) -> DataLoader:
        return DataLoader(ExtractionItems(dataset, cfg.with_images), batch_sampler=batches, collate_fn=collate,
                          num_workers=cfg.workers, pin_memory=device.type == "cuda")

    side, fit_plan, fitted = None, [], []
    phases = dict.fromkeys(EXTRACT_PHASES, 0.0)  # seconds of this process's main loop, by what it waited on
    started = None
    if needs_basis(cfg.codec) and not cfg.pca_step > 0:
        raise PkdError(f"--pca-step must be > 0, got {cfg.pca_step}")
    if ranks.is_main:
        if needs_basis(cfg.codec):  # fitted once, by rank 0, before the first shard; a resumed store keeps its own
            side = None if cfg.overwrite else existing_side(cfg.out)
            if side is None:  # a new store: fitted on its first batches, which rank 0 then encodes, not re-runs
                started = time.perf_counter()
                fit_shards = range(min(n_shards, -(-FIT_SAMPLES // cfg.samples_per_shard)))
                fit_plan = first_batches(plan(fit_shards), FIT_SAMPLES)
                side, fitted = fit_side(teacher, loader_of(fit_plan), strides, device, frozenset(projected),
                                        cfg.pca_step, backbone)
                phases["fit"] = time.perf_counter() - started
        writer = create_store(str(cfg.out), make_manifest(side_record(side)), overwrite=bool(cfg.overwrite),
                              side=side)
    barrier(ranks)
    if needs_basis(cfg.codec) and not ranks.is_main:  # every rank encodes with the basis the store holds
        side = existing_side(cfg.out)
        if side is None:
            raise PkdError(f"the store at {cfg.out} holds no readable pca basis: re-run extraction with --overwrite")
    manifest = make_manifest(side_record(side))
    if not ranks.is_main:
        writer = create_store(str(cfg.out), manifest)
    bases = {} if side is None else read_side(side, {level.stride: level.channels for level in manifest.levels},
                                             str(cfg.out))
    bases = {stride: device_basis(basis, device) for stride, basis in bases.items()}  # copied to the device once
    done = writer.completed_shards()
    todo = [k for k in range(ranks.rank, manifest.n_shards, ranks.world_size) if k not in done]
    batches = plan(todo)
    reused = 0  # the fit's batches that open this rank's work (those of other ranks' shards are theirs to run)
    while reused < min(len(fit_plan), len(batches)) and batches[reused] == fit_plan[reused]:
        reused += 1
    del fitted[reused:]
    loader = loader_of(batches[reused:])
    todo_samples = sum(len(manifest.shard_range(k)) for k in todo)
    writer_thread = ShardWriterThread(writer, manifest, writers=default_writer_threads())
    writer_thread.start()
    bar = tqdm(total=todo_samples, desc=f"extract {cfg.teacher}", unit="img",
               disable=not cfg.progress or not ranks.is_main)

    def hand_over(samples: list[Sample]) -> None:
        """Queue a batch's samples for the shard writers (timed: a full queue waits for a free writer)."""
        tick = time.perf_counter()
        for sample in samples:
            writer_thread.put(sample)
        phases["writers"] += time.perf_counter() - tick
        bar.update(len(samples))

    pending: list[LaunchedBatch] = []  # at most one: a batch is finished once the next one is launched

    def encode_batch(batch: list[dict], maps: TeacherMaps) -> None:
        """Encode a batch on the device and start its copy to the host; then finish the previous batch, whose
        copy is done by the time this one's work runs, so the device stays busy while the host waits."""
        tick = time.perf_counter()
        pending.append(launch_encode(batch, maps, strides, cfg.codec, bases))
        phases["encode"] += time.perf_counter() - tick
        if len(pending) > 1:
            finish_oldest()

    def finish_oldest() -> None:
        tick = time.perf_counter()
        samples = finish(pending.pop(0), manifest.n_views)
        phases["device"] += time.perf_counter() - tick
        hand_over(samples)

    try:
        while fitted:  # the batches the basis was fitted on: encoded from the maps the fit kept
            encode_batch(*fitted.pop(0))
        batches_in = iter(loader)
        while True:
            tick = time.perf_counter()
            batch = next(batches_in, None)
            if batch is None:
                break
            if started is None:
                started = time.perf_counter()  # the first batch is in: start-up is over
            else:
                phases["images"] += time.perf_counter() - tick
            tick = time.perf_counter()
            maps = teacher_levels(teacher, batch, strides, device, frozenset(projected), backbone)
            phases["teacher"] += time.perf_counter() - tick
            encode_batch(batch, maps)
        while pending:
            finish_oldest()
    finally:
        bar.close()
        tick = time.perf_counter()
        writer_thread.close()
        phases["last_shards"] = time.perf_counter() - tick
    if ranks.is_main and started is not None:
        seconds = time.perf_counter() - started
        print(f"extract: {todo_samples} samples in {seconds:.3f} s from the first batch to the last shard written "
              f"({todo_samples / seconds:.1f} samples/s in this process)", file=sys.stderr)
        print("extract phases: " + ", ".join(f"{name} {value:.3f} s" for name, value in phases.items()),
              file=sys.stderr)
        if backbone is not None:
            print(f"extract: cuda graphs {backbone.captures} captured in {backbone.capture_seconds:.3f} s (within the "
                  f"fit and teacher phases)"
                  + (f", not used: {backbone.failed}" if backbone.failed else ""), file=sys.stderr)
    barrier(ranks)
    if ranks.is_main:
        writer.finalize()
    barrier(ranks)
    return cfg.out if "://" in str(cfg.out) else Path(cfg.out)


# Device types on which the teacher runs under bf16 autocast; verify replays the same precision, since
# bf16 vs float32 maps of a Swin-S differ at r ~ 0.9999, the fp16 codec's own threshold.
AUTOCAST_DEVICE_TYPES = ("cuda",)


def teacher_autocast(device: torch.device) -> torch.autocast:
    """The precision the teacher's features are computed in: bf16 autocast on CUDA, float32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type in AUTOCAST_DEVICE_TYPES)


def run_teacher(teacher, batch: list[dict], strides: list[int], device: torch.device, n_views: int, codec: str,
                projected: frozenset[int] = frozenset(), bases: dict | None = None) -> list[Sample]:
    """Teacher FPN maps of one same-size batch as Samples whose levels are encoded with ``codec`` on the
    teacher's device (``teacher_levels``, ``launch_encode``, then ``finish``)."""
    maps = teacher_levels(teacher, batch, strides, device, projected)
    return finish(launch_encode(batch, maps, strides, codec, bases), n_views)


@dataclass
class TeacherMaps:
    """One same-size batch's teacher maps on the teacher's device, nothing yet read back from it.

    ``levels`` {stride: [(image positions in the batch, (n, C, h, w) float32)]}: the maps (one group: the whole
    batch), or for a projected stride their projections, one group per valid size (each image's own size);
    ``statistics`` {projected stride: ((N, C) sums, (N, C) sums of squares) float64} of the maps themselves;
    ``finite`` (levels, N) bool: whether every value of image i at ``strides[j]`` (and its statistics) is finite.
    """

    levels: dict[int, list[tuple[list[int], Tensor]]]
    statistics: dict[int, tuple[Tensor, Tensor]]
    finite: Tensor


@torch.inference_mode()
def teacher_levels(teacher, batch: list[dict], strides: list[int], device: torch.device,
                   projected: frozenset[int] = frozenset(), backbone=None) -> TeacherMaps:
    """The teacher's FPN maps of one same-size batch (``TeacherMaps``), a stride in ``projected`` replaced by
    its projection for a student of twice the stride (``project_images``, one call per valid size in the
    batch). Only launches work on the device: nothing here waits for it (``finish`` reads the checks).
    ``backbone``: a stand-in for the teacher's backbone+FPN (``graphed_backbone``; None: the teacher's own)."""
    images = [item["image"].to(device, non_blocking=True) for item in batch]
    with teacher_autocast(device):
        features, _ = teacher.features(images, backbone)
    everyone = list(range(len(batch)))
    levels: dict[int, list[tuple[list[int], Tensor]]] = {}
    statistics: dict[int, tuple[Tensor, Tensor]] = {}
    finite = torch.ones(len(strides), len(batch), dtype=torch.bool, device=features[strides[0]].device)
    for j, s in enumerate(strides):
        if s not in projected:
            levels[s] = [(everyone, features[s].float())]
        else:
            by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
            for i, item in enumerate(batch):
                by_size[level_size(item["image_hw"], s)].append(i)
            levels[s] = []
            total = features[s].new_zeros(len(batch), features[s].shape[1], dtype=torch.float64)
            square = total.clone()
            for valid_hw, indices in by_size.items():
                rows = device_rows(indices, len(batch), total.device)
                cross, total[rows], square[rows] = project_images(features[s][rows], valid_hw)
                levels[s].append((indices, cross))
            statistics[s] = (total, square)
            finite[j] &= torch.isfinite(total.sum(dim=1) + square.sum(dim=1))
        # A map's max and min are finite exactly when all its values are (NaN and Inf reach them).
        for indices, maps in levels[s]:
            flat = maps.flatten(1)
            finite[j, device_rows(indices, len(batch), finite.device)] &= torch.isfinite(flat.amax(dim=1) + flat.amin(dim=1))
    return TeacherMaps(levels, statistics, finite)


def device_rows(indices: list[int], size: int, device: torch.device) -> slice | Tensor:
    """An index of ``indices`` (positions in a batch of ``size``) that does not wait for the device: a slice for
    the whole batch, else an int64 tensor copied from page-locked memory (a Python list would be copied from
    pageable memory, which waits for all queued work)."""
    if indices == list(range(size)):
        return slice(None)
    rows = torch.tensor(indices, dtype=torch.int64)
    return rows.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else rows


@dataclass
class LaunchedBatch:
    """A batch whose encoded levels are being copied to the host (``launch_encode``); ``finish`` waits for the
    copies (``done``, a CUDA event; None where the device is the host) and makes Samples of them."""

    batch: list[dict]
    strides: list[int]
    codec: str
    parts: dict[int, list[tuple[list[int], dict[str, Tensor]]]]  # stride -> [(positions, part -> (n, ...))], host
    statistics: dict[int, tuple[Tensor, Tensor]]  # projected stride -> (N, C) float64 sums, sums of squares
    finite: Tensor  # (levels, N) bool
    out_of_range: list[Tensor]  # 0-dim bool flags of the device encoders (on the host)
    done: torch.cuda.Event | None


def to_host(tensor: Tensor) -> Tensor:
    """A copy on the host that does not wait for the device (page-locked; valid once the batch's event is done)."""
    return tensor.to("cpu", non_blocking=True)


@torch.inference_mode()
def launch_encode(batch: list[dict], maps: TeacherMaps, strides: list[int], codec: str,
                  bases: dict | None = None) -> LaunchedBatch:
    """Encode ``maps`` with ``codec`` where they lie (``DEVICE_ENCODERS``; ``bases`` {stride: LevelBasis or
    DeviceBasis} for a codec that needs one) and start copying the stored values, the statistics and the checks to
    the host, without waiting for the device: only the encoded values cross (fp16: half of float32)."""
    parts, flags = {}, []
    for s in strides:
        parts[s] = []
        for indices, values in maps.levels[s]:
            encoded, out_of_range = DEVICE_ENCODERS[codec](values, (bases or {}).get(s))
            parts[s].append((indices, {name: to_host(part) for name, part in encoded.items()}))
            if out_of_range is not None:
                flags.append(to_host(out_of_range))
    statistics = {s: (to_host(total), to_host(square)) for s, (total, square) in maps.statistics.items()}
    finite = to_host(maps.finite)
    device = maps.finite.device
    done = None
    if device.type == "cuda":
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(device))
    return LaunchedBatch(batch, strides, codec, parts, statistics, finite, flags, done)


def raise_if_not_finite(batch: list[dict], finite: Tensor, strides: list[int]) -> None:
    """PkdError naming the first image whose maps hold NaN or Inf (``finite``: (levels, N) bool on the host)."""
    for i, item in enumerate(batch):
        for j, s in enumerate(strides):
            if not finite[j, i]:
                raise PkdError(f"teacher features of image {item['image_id']} (view {item['view_index']}, stride "
                               f"{s}) hold NaN or Inf: nothing was written for it; check the checkpoint and the image")


def finish(launched: LaunchedBatch, n_views: int) -> list[Sample]:
    """Wait for ``launched``'s copies and make its Samples. PkdError naming the image if any value is NaN or Inf
    (nothing of the batch is written), or naming the batch's images if the codec cannot hold the values."""
    if launched.done is not None:
        launched.done.synchronize()
    batch, strides = launched.batch, launched.strides
    raise_if_not_finite(batch, launched.finite, strides)
    try:
        for flag in launched.out_of_range:
            check_range(launched.codec, flag)
    except ValueError as error:
        raise PkdError(f"images {[item['image_id'] for item in batch]}: {error}") from None
    features: list[dict[int, EncodedLevel]] = [{} for _ in batch]
    for s, groups in launched.parts.items():
        for indices, group in groups:
            group = {name: values.numpy() for name, values in group.items()}
            for k, i in enumerate(indices):
                features[i][s] = EncodedLevel(launched.codec, {name: values[k] for name, values in group.items()})
    statistics = {s: (total.numpy(), square.numpy()) for s, (total, square) in launched.statistics.items()}
    return [Sample(index=item["image_index"] * n_views + item["view_index"], image_id=item["image_id"],
                   view_index=item["view_index"], image_hw=tuple(item["image_hw"]), features=features[i],
                   extras=item.get("extras", {}),
                   statistics={s: {"sum": total[i], "sum_sq": square[i]} for s, (total, square) in statistics.items()})
            for i, item in enumerate(batch)]
