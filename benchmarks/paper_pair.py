"""The paper's pair, side by side: Swin-S teacher (backbone+FPN, 256 channels) and RetinaNet-R50 student
at full width, the ``index`` pairing on teacher P2..P5 stored in the projected layout (the default for
index stores), random init (speed does not depend on the weights). Called by ``benchmarks/run.py
--pair paper``; every figure is a median over interleaved rounds, and every ratio is taken in one run.

Figures (seconds per step, images/s): the student step alone, offline PKD from zarr and from
WebDataset (default codec), online PKD (the teacher forward in the loop), the PKD loss's share of the
step (same preloaded batch with and without the loss), and the whole ``extract`` command's marginal
rate against the teacher forward alone on the same inputs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

from pkd_offline.data import CocoDetection, ViewSampler, collate
from pkd_offline.engine import Distillation, training_step
from pkd_offline.levels import pair_levels
from pkd_offline.models import build_detector
from stages.extract import FIT_SAMPLES, ExtractConfig, extract
from stages.store_data import StoreJoinedDataset, StoreStream, store_views
from stages.synth import SynthConfig, synth
from stages.teachers import load_teacher
from storage import open_store

TEACHER, STUDENT, BACKBONE = "swin_s", "retinanet", "resnet50"
TEACHER_LEVELS, STUDENT_LEVELS = "2,3,4,5", "3,4,5,6"  # the official `index` pairing: teacher P2..P5 -> student P3..P6
SHORT_SIDE, MAX_SIZE = 320, 448  # px: synth images are 448 wide, 448 or 336 high, resized to short side 320
BATCH = 2


def paper_extract_config(args, data: Path, out: Path, store_format: str) -> ExtractConfig:
    """Stage one as a user runs it for the pair: one view, the projected index layout, the default codec."""
    return ExtractConfig(teacher=TEACHER, random_init=True, variant="full", data=data, out=out,
                         store_format=store_format, codec=args.codec, views=1, levels=TEACHER_LEVELS,
                         layout="projected", student_levels=STUDENT_LEVELS, short_side=SHORT_SIDE,
                         max_size=MAX_SIZE, batch_size=BATCH, workers=args.workers, device=args.device,
                         samples_per_shard=64, progress=False, overwrite=True)


def interleaved(steps: dict[str, Callable[[], None]], per_round: int, rounds: int) -> dict[str, float]:
    """Median seconds of each callable, run ``per_round`` times per round, modes interleaved round by
    round; round 0 warms up (workers, caches, allocator) and is not counted."""
    times = {name: [] for name in steps}
    for round_index in range(rounds + 1):
        for name, step in steps.items():
            for _ in range(per_round):
                tick = time.perf_counter()
                step()
                if round_index > 0:
                    times[name].append(time.perf_counter() - tick)
    return {name: statistics.median(values) for name, values in times.items()}


def cycling(loader: DataLoader) -> Callable[[], list]:
    """The next batch of ``loader``, restarting it at the end of an epoch."""
    state = {"iter": iter(loader)}

    def take() -> list:
        try:
            return next(state["iter"])
        except StopIteration:
            state["iter"] = iter(loader)
            return next(state["iter"])
    return take


def step_runs(args, data: Path, stores: dict[str, Path]
              ) -> tuple[dict[str, Callable[[], None]], Callable[[bool], None]]:
    """One training-step callable per mode (alone, offline_<store>, online), each with its own student,
    optimiser and DataLoader, and a ``loss_probe(with_loss)`` stepping one preloaded offline batch."""
    device = torch.device(args.device)
    views = store_views(next(iter(stores.values())))
    steps, probe = {}, None
    for name in ["alone", *[f"offline_{k}" for k in stores], "online"]:
        torch.manual_seed(0)
        dataset = CocoDetection(data, "train", views)
        model = build_detector(STUDENT, num_classes=dataset.num_classes, variant="full", backbone=BACKBONE).to(device)
        distill, source = None, dataset
        if name.startswith("offline_"):
            path = stores[name.removeprefix("offline_")]
            strides = [level.stride for level in open_store(str(path)).manifest.levels]
            distill = Distillation(pair_levels(list(model.strides), strides, "index"), 6.0)
            source = (StoreStream(dataset, path, shuffle_buffer=16) if "wds" in name
                      else StoreJoinedDataset(dataset, path))
        elif name == "online":
            teacher, _ = load_teacher(TEACHER, checkpoint=None, random_init=True, variant="full",
                                      num_classes=dataset.num_classes)
            distill = Distillation(pair_levels(list(model.strides), list(teacher.strides)[:4], "index"), 6.0,
                                   teacher.to(device))
        streaming = isinstance(source, torch.utils.data.IterableDataset)
        loader = DataLoader(source, batch_size=BATCH, collate_fn=collate, num_workers=args.workers,
                            sampler=None if streaming else ViewSampler(len(dataset), len(views), seed=0),
                            persistent_workers=args.workers > 0)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        take = cycling(loader)

        def step(model=model, take=take, optimizer=optimizer, distill=distill) -> None:
            training_step(model, take(), optimizer, device=device, distill=distill, size_divisor=32)
        steps[name] = step
        if name == "offline_zarr":
            batch = take()

            def probe(with_loss: bool, model=model, batch=batch, optimizer=optimizer, distill=distill) -> None:
                training_step(model, batch, optimizer, device=device, distill=distill if with_loss else None,
                              size_divisor=32)
    return steps, probe


def bench_paper_extraction(args, work: Path) -> dict:
    """Marginal images/s of the whole ``extract`` (the images a larger run adds to a smaller one, over the
    difference of their seconds, so start-up cancels) vs the teacher's backbone+FPN forward alone on those same
    images, preloaded and resized, batch ``BATCH`` of one size.

    The larger run's images are the smaller run's plus more (``nested_data``), and both hold more than
    ``FIT_SAMPLES`` samples, so the pca fit (the store's first 32 samples: their moments, once per store, like
    start-up) is the same in both and cancels too, as it does at COCO size (32 of 118k samples).
    ``args.paper_extract_images``: the two runs' image counts."""
    from nested_data import added_indices, nested_data  # beside this file, as run.py imports paper_pair

    device = torch.device(args.device)
    small, large = args.paper_extract_images
    data, more = nested_data(work / "paper-extract-data", small, large, MAX_SIZE)
    dataset = CocoDetection(more, "train", store_views(work / "paper.zarr"))
    teacher, _ = load_teacher(TEACHER, checkpoint=None, random_init=True, variant="full",
                              num_classes=dataset.num_classes)
    teacher.to(device)
    # The extra images, same-size ones batched together as extraction batches them (a mixed batch would pad, and
    # the forward alone would then do more work than extraction does).
    extra = added_indices(dataset, data)
    images = sorted((dataset[(i, 0)]["image"] for i in extra), key=lambda image: tuple(image.shape))
    with torch.inference_mode():  # warm-up: the first forward of each size selects kernels, as extraction's fit does
        for shape in {tuple(image.shape) for image in images}:
            teacher.features([image.to(device) for image in images if tuple(image.shape) == shape][:BATCH])

    def forward_rate() -> float:
        tick = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(images), BATCH):
                features, _ = teacher.features([image.to(device) for image in images[start:start + BATCH]])
                features[32].float().sum().item()
        return len(images) / (time.perf_counter() - tick)

    # This machine's speed drifts by up to a fifth over minutes (the same fit phase took 16-23 s within one run),
    # so each round's extraction is compared with the forward measured right before and right after it.
    rounds = []
    for _ in range(args.paper_extract_rounds):
        before = forward_rate()
        seconds = []
        for source in (data, more):
            tick = time.perf_counter()
            extract(paper_extract_config(args, source, work / "paper-extract.zarr", "zarr"))
            seconds.append(time.perf_counter() - tick)
        forward = (before + forward_rate()) / 2
        whole = len(images) / max(seconds[1] - seconds[0], 1e-9)
        rounds.append({"forward_img_per_s": forward, "extract_img_per_s": whole, "ratio": whole / forward,
                       "whole_command_seconds": seconds})
    return {"extract_img_per_s": statistics.median(r["extract_img_per_s"] for r in rounds),
            "forward_img_per_s": statistics.median(r["forward_img_per_s"] for r in rounds),
            "extract_ratio_over_forward": statistics.median(r["ratio"] for r in rounds),
            "extract_images": [small, large], "fit_samples": FIT_SAMPLES, "rounds": rounds}


def bench_paper_store(args, data: Path, stores: dict[str, Path], work: Path, step_alone: float) -> dict:
    """Issue 11's store figures (``benchmarks/store_cost.py``) on the zarr store, against an fp32 store of the same
    layout and images."""
    from store_cost import decode_rate, grad_cosine, store_bytes  # beside this file, as run.py imports paper_pair

    exact_args = argparse.Namespace(**{**vars(args), "codec": "fp32"})
    exact = extract(paper_extract_config(exact_args, data, work / "paper-fp32.zarr", "zarr"))
    figures = store_bytes(stores["zarr"])
    rate = decode_rate(stores["zarr"], args.workers, args.paper_rounds)
    consumption = BATCH / step_alone
    torch.manual_seed(0)
    student = build_detector(STUDENT, num_classes=CocoDetection(data, "train", store_views(exact)).num_classes,
                             variant="full", backbone=BACKBONE).to(torch.device(args.device)).eval()
    figures.update({"decode_samples_per_s": rate, "consumption_samples_per_s": consumption,
                    "decode_rate_over_consumption": rate / consumption,
                    "grad_cosine_default": grad_cosine(data, stores["zarr"], exact, student, BATCH,
                                                       torch.device(args.device))})
    return figures


def bench_paper(args, work: Path) -> dict:
    """Every paper-pair figure and the four headline keys (see the module docstring)."""
    n = args.paper_images
    data = synth(SynthConfig(out=work / "paper-data", train=n, val=2, image_size=MAX_SIZE, seed=0))
    stores = {fmt: extract(paper_extract_config(args, data, work / f"paper.{fmt}", fmt)) for fmt in ("zarr", "wds")}
    print(f"paper pair: {TEACHER} teacher P2..P5 -> {STUDENT}/{BACKBONE} P3..P6 (index, projected, {args.codec}), "
          f"full width, {n} images at short side {SHORT_SIDE} (max {MAX_SIZE}), batch {BATCH}, {args.workers} workers")
    steps, probe = step_runs(args, data, stores)
    step = interleaved(steps, args.paper_steps, args.paper_rounds)
    print("paper step (median s, data loading included): " + ", ".join(f"{k} {v:.3f}" for k, v in step.items()))
    loss = interleaved({"model_only": lambda: probe(False), "model_plus_pkd_loss": lambda: probe(True)},
                       args.paper_steps, args.paper_rounds)
    loss["pkd_loss_seconds"] = loss["model_plus_pkd_loss"] - loss["model_only"]
    loss["pkd_loss_share_of_step"] = loss["pkd_loss_seconds"] / loss["model_plus_pkd_loss"]
    print(f"paper loss share (same preloaded batch, median s): {loss}")
    del steps, probe
    store = bench_paper_store(args, data, stores, work, step["alone"])
    print(f"paper store ({args.codec}, projected): {store}")
    extraction = bench_paper_extraction(args, work)
    print(f"paper extraction: {extraction}")
    offline = {k: step[f"offline_{k}"] / step["alone"] for k in stores}
    worse = max(offline.values())
    return {
        "paper_step_ratio_offline_over_alone": worse,
        "paper_step_ratio_online_over_alone": step["online"] / step["alone"],
        "paper_offline_over_online": worse * step["alone"] / step["online"],
        "paper_extract_ratio_over_forward": extraction["extract_ratio_over_forward"],
        **{key: store[key] for key in ("index_store_bytes_over_fp32_maps", "bytes_ratio_default_codec_over_fp32",
                                       "decode_rate_over_consumption", "grad_cosine_default")},
        "paper_store": store,
        "paper_step_ratio_offline_over_alone_by_format": offline,
        "paper_step_seconds": step, "paper_loss": loss, "paper_extraction": extraction,
        "paper_setup": {"teacher": TEACHER, "student": f"{STUDENT}/{BACKBONE}", "variant": "full",
                        "pairing": "index P2..P5 -> P3..P6, projected", "codec": args.codec, "images": n,
                        "short_side": SHORT_SIDE, "max_size": MAX_SIZE, "batch": BATCH, "workers": args.workers,
                        "steps_per_round": args.paper_steps, "rounds": args.paper_rounds},
    }
