"""Stage one: run the teacher's backbone+FPN once over a data set and store every level, compressed.

``extract(cfg)`` wires the pieces of ``pkd_offline.extraction`` to an ``ExtractConfig``: the shard plan (a shard is
the unit of atomic writes and of resume: a killed run re-run with the same arguments skips the finished shards),
the pca basis fit, the store, and the ``DevicePipeline`` that runs the teacher and writes the shards. It returns
the store's path; ``run_extraction(cfg)`` returns the run's record (``ExtractionResult``).
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from pkd_offline.config import ON_ERROR, WEIGHTS_HELP, check_choices, check_config, setting
from pkd_offline.data import CocoDetection, file_sha256
from pkd_offline.device_codecs import device_basis
from pkd_offline.distributed import Ranks, barrier, init_ranks, resolve_device
from pkd_offline.errors import PkdError
from pkd_offline.extraction.encode import launch_encode
from pkd_offline.extraction.layout import LAYOUTS, level_specs, parse_levels, projected_strides, store_layout
from pkd_offline.extraction.pca_fit import fit_side
from pkd_offline.extraction.pipeline import DevicePipeline
from pkd_offline.extraction.plan import FIT_SAMPLES, ShardPlan, readable_images, shared_prefix
from pkd_offline.extraction.result import ExtractionResult
from pkd_offline.extraction.teacher_maps import TeacherMaps, teacher_levels
from pkd_offline.extraction.writers import default_writer_threads
from pkd_offline.graphed_forward import GraphedForward, graphed_backbone
from pkd_offline.models import DETECTORS, VARIANTS, FeatureDetector
from pkd_offline.teachers import load_teacher
from pkd_offline.views import View, make_views, view_padded_size
from storage import LevelSpec, Manifest, create_store, detect_format
from storage.codecs import CODECS, needs_basis
from storage.manifest import FORMATS
from storage.base import StoreWriter
from storage.pca_basis import DEFAULT_STEP, SIDE_NAME, read_side, side_sha256
from storage.store import existing_side


@dataclass
class ExtractConfig:
    """Stage-one settings; pixel sizes in px, ``levels`` as pyramid level numbers (P2 = stride 4)."""

    teacher: str = setting("swin", help="the teacher detector whose backbone+FPN maps are stored",
                           choices=lambda: tuple(DETECTORS), noun="teacher")
    checkpoint: Path | None = setting(None, help=f"teacher weights: {WEIGHTS_HELP}")
    random_init: bool = setting(False, help="random teacher weights (seeded): smoke tests only")
    variant: str = setting("full", help="model size of --random-init (tiny: CPU runs and tests); a checkpoint "
                                        "brings its own", choices=VARIANTS, noun="variant")
    data: Path = setting(Path("data/synth"), help="the COCO-format data set's directory")
    split: str = setting("train", help="the data set's split to extract (train, val)")
    out: str | Path = setting(Path("features/train.zarr"), help="store path or fsspec URL (s3://bucket/features.zarr)")
    store_format: str | None = setting(None, help="store format (default: zarr for a *.zarr --out, else wds)",
                                       choices=FORMATS, flag="--format", noun="store format")
    codec: str = setting("fp16", help="fp32, fp16, int8 (the bits study's int6, int4, int2), or pca: decorrelated "
                                      "channels, --pca-step", choices=lambda: tuple(CODECS), noun="codec")
    pca_step: float = setting(DEFAULT_STEP, help="pca codec: rounding step of each component at the finest level, "
                                                 f"in channel std units (default {DEFAULT_STEP})")
    views: int = setting(1, help="views (resize scale, flip) per image, each stored as a sample")
    levels: str | None = setting(None, help="pyramid levels to keep, e.g. 2,3,4,5 (P2 = stride 4)")
    layout: str = setting("full", help="projected: store each level as the PKD loss uses it at the paired student "
                                       "level", choices=LAYOUTS, noun="layout")
    student_levels: str | None = setting(None, help="with --layout projected: the student levels paired by index, "
                                                    "e.g. 3,4,5,6")
    short_side: int = setting(800, help="resize: the image's short side, px")
    max_size: int = setting(1333, help="resize: the long side at most, px")
    size_divisor: int = setting(32, help="images padded to a multiple of this, px")
    batch_size: int = setting(8, help="images per teacher forward (each batch one padded size)")
    workers: int = setting(2, help="DataLoader worker processes decoding images")
    device: str = setting("cpu", help="cpu, cuda or cuda:N (under torchrun, each rank its own GPU)")
    samples_per_shard: int = setting(64, help="samples (image x view) per shard: the unit of atomic writes and of "
                                              "resume")
    on_error: str = setting("stop", help="an image that does not decode: stop, naming it, or skip it (listed in "
                                         "the manifest)", choices=ON_ERROR)
    with_images: bool = setting(False, help="also store image bytes and boxes (WebDataset)")
    overwrite: bool = setting(False, help="replace a store of another job at --out")
    seed: int = setting(0, help="seed of --random-init's weights")
    progress: bool = setting(True, help="no progress bar")
    cuda_graphs: bool = setting(True, help="run the teacher on CUDA without graphs (by default one is captured per "
                                           "batch shape)", flag="--no-cuda-graphs")
    record: Path | None = setting(None, help="write the run's record (counts, seconds per phase, rates) to this "
                                             "file as JSON")

    def validate(self) -> None:
        """PkdError (one line) for a name outside a setting's choices or a count or size out of its range."""
        check_choices(self)
        for name in ("views", "short_side", "max_size", "size_divisor", "batch_size", "samples_per_shard"):
            if getattr(self, name) < 1:
                raise PkdError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise PkdError(f"--workers must be 0 or more, got {self.workers}")
        if needs_basis(self.codec) and not self.pca_step > 0:
            raise PkdError(f"--pca-step must be > 0, got {self.pca_step}")


@dataclass
class ExtractionJob:
    """What a config resolves to before any sample is extracted: the data (images that decode, with
    ``--on-error skip``), the teacher on its device (and its graphed backbone+FPN on CUDA, else None), the stored
    strides (px), layout and level shapes, and the shard plan."""

    dataset: CocoDetection
    views: list[View]
    teacher: FeatureDetector
    identity: dict
    backbone: GraphedForward | None
    strides: list[int]
    layout: dict
    levels: list[LevelSpec]
    skipped: list[dict]
    plan: ShardPlan
    store_format: str


def prepare(cfg: ExtractConfig, ranks: Ranks, device: torch.device) -> ExtractionJob:
    """The job ``cfg`` describes (``ExtractionJob``); the teacher loaded and moved to ``device``."""
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
    layout = store_layout(cfg.layout, cfg.student_levels, strides, cfg.size_divisor)
    skipped: list[dict] = []
    if cfg.on_error == "skip":
        good, skipped = readable_images(dataset, cfg.workers)
        dataset.image_ids = good
    levels = level_specs(dataset, views, strides, teacher.channels, projected_strides(layout))
    return ExtractionJob(dataset, views, teacher, identity, backbone, strides, layout, levels, skipped,
                         ShardPlan(dataset, views, cfg.samples_per_shard, cfg.batch_size), store_format)


def job_manifest(cfg: ExtractConfig, job: ExtractionJob, side: bytes | None) -> Manifest:
    """The store's manifest; ``side``: the pca basis file's bytes (None: a codec without one)."""
    side_record = None if side is None else {"file": SIDE_NAME, "sha256": side_sha256(side),
                                             "step": float(cfg.pca_step)}
    dataset = job.dataset
    return Manifest(
        format=job.store_format, teacher=job.identity, normalization=job.teacher.transform.normalization(),
        levels=job.levels, codec=cfg.codec, layout=job.layout, views=[v.to_dict() for v in job.views],
        dataset={"annotation_sha256": file_sha256(dataset.annotation_file), "split": cfg.split,
                 "annotation_file": dataset.annotation_file.name, "image_ids": dataset.image_ids},
        samples_per_shard=cfg.samples_per_shard, skipped=job.skipped, codec_side=side_record,
        categories=[{"id": c, "name": str(dataset.coco.cats[c].get("name", c))} for c in dataset.category_ids])


def teacher_forward(cfg: ExtractConfig, job: ExtractionJob, device: torch.device) -> functools.partial:
    """One same-size batch -> its ``TeacherMaps`` (``teacher_levels`` bound to the job). With CUDA graphs, a
    batch is padded to ``cfg.batch_size`` images, so one graph per padded size serves the whole run."""
    return functools.partial(teacher_levels, job.teacher, strides=job.strides, device=device,
                             projected=frozenset(projected_strides(job.layout)), backbone=job.backbone,
                             pad_to=cfg.batch_size if job.backbone is not None else None)


@dataclass
class BasisFit:
    """A pca basis fitted for a new store (rank 0): the side file's bytes (None: no fit), the batches it was
    fitted on with their maps (encoded, not run again), when it started (``time.perf_counter()``) and seconds."""

    side: bytes | None = None
    fitted: list[tuple[list[dict], TeacherMaps]] = field(default_factory=list)
    batches: list[list[tuple[int, int]]] = field(default_factory=list)
    started: float | None = None
    seconds: float = 0.0


def fit_basis(cfg: ExtractConfig, job: ExtractionJob, forward, device: torch.device, ranks: Ranks) -> BasisFit:
    """The pca basis of a new store, fitted once by rank 0 on the store's first batches (``ShardPlan.fit_batches``);
    an empty ``BasisFit`` where the codec needs none, on other ranks, or where the store at ``cfg.out`` (resumed)
    keeps its own (``side`` then holds it)."""
    if not ranks.is_main or not needs_basis(cfg.codec):
        return BasisFit()
    side = None if cfg.overwrite else existing_side(cfg.out)
    if side is not None:
        return BasisFit(side=side)
    started = time.perf_counter()
    batches = job.plan.fit_batches(FIT_SAMPLES)
    loader = job.plan.loader(batches, with_images=cfg.with_images, workers=cfg.workers,
                             pin_memory=device.type == "cuda")
    side, fitted = fit_side(forward, loader, job.strides, cfg.pca_step)
    return BasisFit(side, fitted, batches, started, time.perf_counter() - started)


def open_writer(cfg: ExtractConfig, job: ExtractionJob, fit: BasisFit,
                ranks: Ranks) -> tuple[StoreWriter, Manifest, dict]:
    """(the store writer, its manifest, {stride: pca basis} or {}): rank 0 creates (or resumes) the store, then
    every other rank opens it with the basis it holds."""
    if ranks.is_main:
        writer = create_store(str(cfg.out), job_manifest(cfg, job, fit.side), overwrite=bool(cfg.overwrite),
                              side=fit.side)
    barrier(ranks)
    side = fit.side
    if needs_basis(cfg.codec) and not ranks.is_main:  # every rank encodes with the basis the store holds
        side = existing_side(cfg.out)
        if side is None:
            raise PkdError(f"the store at {cfg.out} holds no readable pca basis: re-run extraction with --overwrite")
    manifest = job_manifest(cfg, job, side)
    if not ranks.is_main:
        writer = create_store(str(cfg.out), manifest)
    bases = {} if side is None else read_side(side, {level.stride: level.channels for level in manifest.levels},
                                             str(cfg.out))
    return writer, manifest, bases


def run_extraction(cfg: ExtractConfig) -> ExtractionResult:
    """Extract the teacher's FPN features of ``cfg.split`` into the store at ``cfg.out``; the record of this
    process's part.

    Under torchrun each rank extracts the shards ``k % world_size == rank`` (never two writers on
    one shard); rank 0 creates the store first and writes the final manifest after all ranks finish.
    """
    check_config(cfg)
    ranks = init_ranks(torch.device(cfg.device.split(":")[0]))
    device = resolve_device(cfg.device, ranks)
    job = prepare(cfg, ranks, device)
    forward = teacher_forward(cfg, job, device)
    fit = fit_basis(cfg, job, forward, device, ranks)
    writer, manifest, bases = open_writer(cfg, job, fit, ranks)
    bases = {stride: device_basis(basis, device) for stride, basis in bases.items()}  # copied to the device once
    done = set(writer.completed_shards())
    todo = job.plan.todo(ranks.rank, ranks.world_size, done)
    batches = job.plan.batches(todo)
    reused = shared_prefix(fit.batches, batches)  # the fit's batches that open this rank's work
    del fit.fitted[reused:]  # (those of other ranks' shards are theirs to run)
    fit_samples = sum(len(batch) for batch, _ in fit.fitted)
    todo_samples = job.plan.samples_in(todo)
    bar = tqdm(total=todo_samples, desc=f"extract {cfg.teacher}", unit="img",
               disable=not cfg.progress or not ranks.is_main)
    pipeline = DevicePipeline(forward, functools.partial(launch_encode, strides=job.strides, codec=cfg.codec,
                                                         bases=bases),
                              writer, manifest, writers=default_writer_threads(), progress=bar.update)
    try:
        record = pipeline.run(fit.fitted, job.plan.loader(batches[reused:], with_images=cfg.with_images,
                                                      workers=cfg.workers, pin_memory=device.type == "cuda"),
                              started=fit.started)
    finally:
        bar.close()
    seconds = time.perf_counter() - record.started if record.started is not None else 0.0
    barrier(ranks)
    if ranks.is_main:
        writer.finalize()
    barrier(ranks)
    return ExtractionResult.of(
        out=str(cfg.out), samples=record.samples, images=job.plan.images_in(todo), samples_total=manifest.n_samples,
        resumed_samples=job.plan.samples_in(done), seconds=seconds, fit_seconds=fit.seconds,
        fit_samples=fit_samples, phase_seconds={"fit": fit.seconds, **record.phase_seconds}, rank=ranks.rank,
        world_size=ranks.world_size, backbone=job.backbone)


def extract(cfg: ExtractConfig) -> Path | str:
    """Extract the teacher's FPN features of ``cfg.split`` into the store at ``cfg.out`` (``run_extraction``);
    returns its path (a URL stays a string). The main process prints the record's summary on stderr and, with
    ``cfg.record``, writes the record there as JSON."""
    result = run_extraction(cfg)
    if result.rank == 0:
        if result.seconds > 0:
            print("\n".join(result.summary()), file=sys.stderr)
        if cfg.record is not None:
            result.write(cfg.record)
    return cfg.out if "://" in str(cfg.out) else Path(cfg.out)
