"""The paper's pair, side by side: ``benchmarks.pairs.PAIRS["paper"]`` (Swin-S teacher P2..P5 stored in the projected
layout, RetinaNet-R50 student P3..P6 paired by index, full width, random init: speed does not depend on the weights),
at the views ``sizes`` gives (a CPU: 320/448 px). Called by ``python -m benchmarks.run --pair paper``.

Figures: the training step of the student alone, offline PKD from zarr and from WebDataset, and online PKD (the
teacher forward in the loop), interleaved in blocks and split into parts (``benchmarks.step``); and the whole
extraction's marginal rate against the teacher forward alone on the same inputs. Every ratio is taken in one run,
with a 95% bootstrap interval over blocks (the step) or rounds (the extraction).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import torch

from benchmarks.nested_data import added_indices, nested_data
from benchmarks.pairs import Pair, extract_config, synthetic_data, train_config
from benchmarks.step import ratio_with_ci, step_benchmark
from benchmarks.store_cost import decode_rate, grad_cosine, store_bytes
from pkd_offline.data import CocoDetection
from pkd_offline.extraction.plan import FIT_SAMPLES
from pkd_offline.models import build_detector
from pkd_offline.precision import forward_autocast
from pkd_offline.store_data import store_views
from pkd_offline.teachers import load_teacher
from stages.extract import extract, run_extraction


def paper_extract_config(args, pair: Pair, data: Path, out: Path, **settings):
    """Stage one as a user runs it for the pair, batch ``pair.batch_size``."""
    return extract_config(pair, data, out, batch_size=pair.batch_size, workers=args.workers, device=args.device,
                          samples_per_shard=64, **settings)


def bench_paper_extraction(args, pair: Pair, work: Path) -> dict:
    """Marginal images/s of the whole extraction (the images a larger run adds to a smaller one, over the
    difference of their records' seconds) vs the teacher's backbone+FPN forward alone on those same images,
    preloaded and resized, batch ``pair.batch_size`` of one size, in the precision extraction uses.

    The larger run's images are the smaller run's plus more (``nested_data``), and both hold more than
    ``FIT_SAMPLES`` samples, so the pca fit (the store's first samples: their moments, once per store) is the same
    in both and cancels. Each round's extraction is compared with the forward measured right before and right
    after it (the machine's speed drifts over minutes); the ratio's interval is over rounds.
    ``args.paper_extract_images``: the two runs' image counts."""
    device = torch.device(args.device)
    small, large = args.paper_extract_images
    data, more = nested_data(work / "paper-extract-data", small, large, pair.max_size)
    dataset = CocoDetection(more, "train", store_views(work / "paper.zarr"))
    teacher, _ = load_teacher(pair.teacher, checkpoint=None, random_init=True, variant=pair.variant,
                              num_classes=dataset.num_classes)
    teacher.to(device)
    # The extra images, same-size ones batched together as extraction batches them (a mixed batch would pad, and
    # the forward alone would then do more work than extraction does).
    extra = added_indices(dataset, data)
    images = sorted((dataset[(i, 0)]["image"] for i in extra), key=lambda image: tuple(image.shape))
    batches = [images[start:start + pair.batch_size] for start in range(0, len(images), pair.batch_size)]
    with torch.inference_mode(), forward_autocast(device):  # warm-up: the first forward of each size picks kernels
        for batch in batches:
            teacher.features([image.to(device) for image in batch])

    def forward_rate() -> float:
        tick = time.perf_counter()
        with torch.inference_mode(), forward_autocast(device):
            for batch in batches:
                features, _ = teacher.features([image.to(device) for image in batch])
                features[32].float().sum().item()
        return len(images) / (time.perf_counter() - tick)

    rounds = []
    for _ in range(args.paper_extract_rounds):
        before = forward_rate()
        records = [run_extraction(paper_extract_config(args, pair, source, work / "paper-extract.zarr"))
                   for source in (data, more)]
        forward = (before + forward_rate()) / 2
        whole = (records[1].samples - records[0].samples) / max(records[1].seconds - records[0].seconds, 1e-9)
        rounds.append({"forward_img_per_s": forward, "extract_img_per_s": whole, "ratio": whole / forward,
                       "record_seconds": [record.seconds for record in records]})
    ratio, interval = ratio_with_ci([r["extract_img_per_s"] for r in rounds], [r["forward_img_per_s"] for r in rounds])
    return {"extract_img_per_s": statistics.median(r["extract_img_per_s"] for r in rounds),
            "forward_img_per_s": statistics.median(r["forward_img_per_s"] for r in rounds),
            "extract_ratio_over_forward": ratio, "extract_ratio_over_forward_ci95": interval,
            "extract_images": [small, large], "fit_samples": FIT_SAMPLES, "rounds": rounds}


def bench_paper_store(args, pair: Pair, data: Path, stores: dict[str, Path], work: Path, step_alone: float) -> dict:
    """The store's figures (``benchmarks.store_cost``: bytes over the fp32 maps, decode rate over consumption) on the zarr store, against an fp32 store of the same
    layout and images."""
    exact = extract(paper_extract_config(args, pair, data, work / "paper-fp32.zarr", codec="fp32"))
    figures = store_bytes(stores["zarr"])
    rate = decode_rate(stores["zarr"], args.workers, args.paper_blocks)
    consumption = pair.batch_size / step_alone
    torch.manual_seed(0)
    student = build_detector(pair.student, num_classes=CocoDetection(data, "train", store_views(exact)).num_classes,
                             variant=pair.variant, backbone=pair.backbone).to(torch.device(args.device)).eval()
    figures.update({"decode_samples_per_s": rate, "consumption_samples_per_s": consumption,
                    "decode_rate_over_consumption": rate / consumption,
                    "grad_cosine_default": grad_cosine(data, stores["zarr"], exact, student, pair.batch_size,
                                                       torch.device(args.device))})
    return figures


def bench_paper(args, pair: Pair, work: Path) -> dict:
    """Every paper-pair figure and the headline keys (``paper_``-prefixed, each ratio beside its ``_ci95``)."""
    n = args.paper_images
    data = synthetic_data(work / "paper-data", n, pair.max_size)
    stores = {fmt: extract(paper_extract_config(args, pair, data, work / f"paper.{fmt}", store_format=fmt))
              for fmt in ("zarr", "wds")}
    print(f"paper pair: {pair.teacher} teacher levels {pair.teacher_levels} -> {pair.student}/{pair.backbone} "
          f"({pair.level_map}, {pair.layout}, {pair.codec}), {pair.variant} width, {n} images at short side "
          f"{pair.short_side} (max {pair.max_size}), batch {pair.batch_size}, {args.workers} workers")
    common = dict(workers=args.workers, device=args.device)
    configs = {"alone": train_config(pair, data, **common),
               **{f"offline_{fmt}": train_config(pair, data, features=path, **common) for fmt, path in stores.items()},
               "online": train_config(pair, data, online=True, **common)}
    step = step_benchmark(configs, stores["zarr"], blocks=args.paper_blocks, steps_per_block=args.paper_steps,
                          warmup=args.paper_warmup)
    print("paper step (median ms): " + ", ".join(f"{mode} {parts['step']:.1f}"
                                                 for mode, parts in step["step_breakdown_ms"].items()))
    store = bench_paper_store(args, pair, data, stores, work, step["step_seconds"]["alone"])
    print(f"paper store ({pair.codec}, {pair.layout}): {store}")
    extraction = bench_paper_extraction(args, pair, work)
    print(f"paper extraction: {extraction}")
    headline = {}
    for key in ("step_ratio_offline_over_alone", "step_ratio_online_over_alone", "offline_over_online"):
        headline[f"paper_{key}"], headline[f"paper_{key}_ci95"] = step[key], step[f"{key}_ci95"]
    headline["paper_extract_ratio_over_forward"] = extraction["extract_ratio_over_forward"]
    headline["paper_extract_ratio_over_forward_ci95"] = extraction["extract_ratio_over_forward_ci95"]
    return {
        **headline,
        **{key: store[key] for key in ("index_store_bytes_over_fp32_maps", "bytes_ratio_default_codec_over_fp32",
                                       "decode_rate_over_consumption", "grad_cosine_default")},
        "paper_store": store, "paper_step": step, "paper_extraction": extraction,
        "paper_setup": {**dataclasses.asdict(pair), "images": n, "workers": args.workers,
                        "steps_per_block": args.paper_steps, "blocks": args.paper_blocks},
    }
