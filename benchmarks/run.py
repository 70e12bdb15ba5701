"""Benchmarks: the store removes the teacher's cost. Every figure is a ratio measured side by side in one run.

    python benchmarks/run.py --quick               # the paper's pair (the headline), < 5 min on a 2-core CPU
    python benchmarks/run.py                       # the paper's pair, more steps and rounds
    python benchmarks/run.py --pair tiny --quick   # the tiny pair: the data path's stress case
    python benchmarks/run.py --pair tiny --device cuda --image-size 1333 --variant full   # COCO resolution on a GPU

``--pair paper`` (benchmarks/paper_pair.py: Swin-S -> RetinaNet-R50, full width, index pairing,
projected layout, the default codec ``pca`` or ``--codec``) ends with one JSON line with
paper_step_ratio_offline_over_alone (the worse store format), paper_step_ratio_online_over_alone,
paper_offline_over_online, paper_extract_ratio_over_forward, and the store's figures
(benchmarks/store_cost.py): index_store_bytes_over_fp32_maps, bytes_ratio_default_codec_over_fp32,
decode_rate_over_consumption and grad_cosine_default. ``--pair tiny`` prints tables, then one JSON line with
step_ratio_offline_over_alone, step_ratio_online_over_alone, extract_ratio_over_forward,
read_rate_over_consumption, bytes_ratio_default_codec_over_fp32 and min_r_default_codec (and the
rest of the figures).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pkd_offline.checkpoint import save_checkpoint  # noqa: E402
from pkd_offline.data import CocoDetection, ViewSampler, collate  # noqa: E402
from pkd_offline.engine import Distillation, training_step  # noqa: E402
from pkd_offline.levels import pair_levels  # noqa: E402
from pkd_offline.models import build_detector  # noqa: E402
from stages.extract import FIT_SAMPLES, ExtractConfig, extract  # noqa: E402
from stages.store_data import StoreJoinedDataset, StoreStream, store_views  # noqa: E402
from stages.synth import SynthConfig, synth  # noqa: E402
from stages.teachers import load_teacher  # noqa: E402
from storage import describe, open_store  # noqa: E402

DEFAULT_CODEC = "pca"  # the codec the bits study supports (README: How many bits PKD needs); params-coco.yaml's
STRESS_CODEC = "int8"  # the tiny pair's step and read stores (their names say so), as measured before pca existed
COCO_TRAIN_IMAGES = 118_287  # every image of instances_train2017.json: extract stores all of them, annotated or not
COCO_PIXELS = 800 * 1067  # the typical COCO image (640x480) resized to short side 800 (1067x800), as the recipe does


def teacher_checkpoint(args, data: Path, work: Path) -> Path:
    """The demo's trained teacher if present, else a seeded random one saved as a project checkpoint."""
    if args.teacher_checkpoint and Path(args.teacher_checkpoint).exists():
        return Path(args.teacher_checkpoint)
    teacher, _ = load_teacher("swin", checkpoint=None, random_init=True, variant=args.variant, num_classes=7)
    path = work / "random_teacher.pt"
    save_checkpoint(path, {"spec": teacher.spec, "model": teacher.state_dict(), "category_ids": [], "views": []})
    print(f"note: {args.teacher_checkpoint} not found, fidelity measured on a random-init teacher (run dvc repro first)")
    return path


def extract_config(args, data: Path, out: Path, checkpoint: Path, **overrides) -> ExtractConfig:
    settings = dict(teacher="swin", checkpoint=checkpoint, variant=args.variant, data=data, out=out, views=2,
                    levels="2,3,4,5,6", short_side=args.image_size, max_size=args.image_size, batch_size=8,
                    workers=args.workers, device=args.device, samples_per_shard=64, progress=False, overwrite=True)
    return ExtractConfig(**{**settings, **overrides})


def bench_extraction(args, checkpoint: Path, work: Path) -> dict:
    """Steady-state images/s of the whole extract (decode, resize, forward, encode, write) vs the
    teacher forward alone on the same preloaded inputs. The extract rate is marginal: the time of
    a run on 2x the images minus a run on 1x (its first half, ``nested_data``), so start-up (model load,
    worker spawn) cancels; the forward alone runs on the images the larger run adds."""
    from nested_data import added_indices, nested_data

    device = torch.device(args.device)
    teacher, _ = load_teacher("swin", checkpoint=checkpoint, random_init=False, variant=args.variant, num_classes=7)
    teacher.to(device)
    data, double = nested_data(work / "extraction-data", args.images, 2 * args.images, args.image_size)
    cfg = extract_config(args, double, work / "extract.zarr", checkpoint, codec=STRESS_CODEC)
    dataset = CocoDetection(double, "train", store_views_of(cfg))
    extra = added_indices(dataset, data)
    batches = [[dataset[(i, v)] for i in extra[start:start + 4] for v in (0, 1)] for start in range(0, len(extra), 4)]
    with torch.inference_mode():  # warm-up: the first forward of each size selects kernels
        teacher.features([item["image"].to(device) for item in batches[0]])
    forward, whole = [], []
    for _ in range(args.rounds):
        tick = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for batch in batches:
                features, _ = teacher.features([item["image"].to(device) for item in batch])
                features[4].float().sum().item()
        forward.append(sum(len(b) for b in batches) / (time.perf_counter() - tick))
        seconds = []
        for source, name in ((data, "x1.zarr"), (double, "x2.zarr")):
            tick = time.perf_counter()
            extract(extract_config(args, source, work / name, checkpoint, codec=STRESS_CODEC))
            seconds.append(time.perf_counter() - tick)
        whole.append(2 * len(extra) / max(seconds[1] - seconds[0], 1e-9))
    return {"extract_img_per_s": statistics.median(whole), "forward_img_per_s": statistics.median(forward),
            "extract_ratio_over_forward": statistics.median(whole) / statistics.median(forward)}


def store_views_of(cfg: ExtractConfig):
    from pkd_offline.views import make_views

    return make_views(cfg.views, cfg.short_side, cfg.max_size, cfg.size_divisor)


def bench_codecs(args, data: Path, checkpoint: Path, work: Path) -> dict:
    """Bytes per image per level and Pearson r (decoded vs fp32) per level, per codec and a by-hand baseline."""
    stores = {}
    for codec in ("fp32", "fp16", "int8", "pca"):
        stores[codec] = extract(extract_config(args, data, work / f"codec-{codec}.zarr", checkpoint, codec=codec))
    reference = open_store(str(stores["fp32"]))
    raw = {level.stride: 0 for level in reference.manifest.levels}
    by_hand = {"np.save fp32": 0, "torch.save fp16": 0}
    pixels = 0
    for sample in reference.iter_samples():
        pixels += sample.image_hw[0] * sample.image_hw[1]
        for stride, values in sample.features.items():
            raw[stride] += values.nbytes
        buffer = io.BytesIO()
        np.save(buffer, np.concatenate([v.ravel() for v in sample.features.values()]))
        by_hand["np.save fp32"] += buffer.tell()
        buffer = io.BytesIO()
        torch.save({s: torch.from_numpy(v).half() for s, v in sample.features.items()}, buffer)
        by_hand["torch.save fp16"] += buffer.tell()
    n = len(reference)
    fp32_per_image = sum(raw.values()) / n
    table = {}
    for codec, path in stores.items():
        store = open_store(str(path))
        sizes = describe(store, digest=False)
        r = {stride: [] for stride in raw}
        for a, b in zip(reference.iter_samples(), store.iter_samples()):
            for stride in raw:
                x, y = a.features[stride].ravel().astype(np.float64), b.features[stride].ravel().astype(np.float64)
                r[stride].append(np.corrcoef(x, y)[0, 1] if x.std() > 0 else 1.0)
        per_level = {stride: sizes["levels"][stride]["bytes_on_disk"] / n for stride in raw}
        table[codec] = {"bytes_per_image": sum(per_level.values()), "bytes_per_image_per_level": per_level,
                        "ratio_to_fp32": sum(per_level.values()) / fp32_per_image,
                        "min_r_per_level": {stride: float(min(v)) for stride, v in r.items()},
                        "bytes_per_pixel_per_level": {stride: per_level[stride] * n / pixels for stride in raw}}
    for name, total in by_hand.items():
        table[name] = {"bytes_per_image": total / n, "ratio_to_fp32": total / n / fp32_per_image}
    table["fp32_raw_bytes_per_image"] = fp32_per_image
    return table


def make_runs(args, data: Path, checkpoint: Path, stores: dict[str, Path]) -> dict:
    """name -> (model, loader, distill, optimizer) for student alone, offline (each store) and online."""
    device = torch.device(args.device)
    runs = {}
    for name in ["alone", *[f"offline_{k}" for k in stores], "online"]:
        torch.manual_seed(0)
        views = store_views(next(iter(stores.values())))
        dataset = CocoDetection(data, "train", views)
        model = build_detector("retinanet", num_classes=dataset.num_classes, variant=args.variant,
                               backbone=args.student_backbone).to(device)
        distill = None
        source = dataset
        if name.startswith("offline_"):
            path = stores[name.removeprefix("offline_")]
            strides = [level.stride for level in open_store(str(path)).manifest.levels]
            distill = Distillation(pair_levels(list(model.strides), strides, "stride")[:4], 6.0)
            source = (StoreStream(dataset, path, shuffle_buffer=64) if "wds" in name else StoreJoinedDataset(dataset, path))
        elif name == "online":
            teacher, _ = load_teacher("swin", checkpoint=checkpoint, random_init=False, variant=args.variant,
                                      num_classes=dataset.num_classes)
            distill = Distillation(pair_levels(list(model.strides), list(teacher.strides), "stride")[:4], 6.0,
                                   teacher.to(device))
        streaming = isinstance(source, torch.utils.data.IterableDataset)
        sampler = None if streaming else ViewSampler(len(dataset), len(views), seed=0)
        loader = DataLoader(source, batch_size=args.batch_size, sampler=sampler, collate_fn=collate,
                            num_workers=args.workers, persistent_workers=args.workers > 0)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        runs[name] = {"model": model, "loader": loader, "distill": distill, "optimizer": optimizer, "iter": None}
    return runs


def next_batch(run: dict):
    if run["iter"] is None:
        run["iter"] = iter(run["loader"])
    try:
        return next(run["iter"])
    except StopIteration:
        run["iter"] = iter(run["loader"])
        return next(run["iter"])


def bench_steps(args, runs: dict) -> dict:
    """Median seconds per training step (data loading included), modes interleaved round by round."""
    device = torch.device(args.device)
    times = {name: [] for name in runs}
    for round_index in range(args.rounds + 1):
        for name, run in runs.items():
            for _ in range(args.steps):
                tick = time.perf_counter()
                batch = next_batch(run)
                training_step(run["model"], batch, run["optimizer"], device=device, distill=run["distill"],
                              size_divisor=32)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if round_index > 0:  # round 0 warms up workers and caches
                    times[name].append(time.perf_counter() - tick)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_breakdown(args, runs: dict) -> dict:
    """Where the offline step's extra time goes: the same preloaded batch (no DataLoader) stepped
    without and with the PKD loss, so the difference is the loss alone; the rest of the offline
    overhead in ``bench_steps`` is the data path (store reads and decoding in the workers)."""
    device = torch.device(args.device)
    batch = next_batch(runs["offline_zarr_int8"])
    times: dict[str, list[float]] = {"model_only": [], "model_plus_pkd_loss": []}
    model, optimizer = runs["offline_zarr_int8"]["model"], runs["offline_zarr_int8"]["optimizer"]
    for round_index in range(args.rounds + 1):
        for name, distill in (("model_only", None), ("model_plus_pkd_loss", runs["offline_zarr_int8"]["distill"])):
            for _ in range(args.steps):
                tick = time.perf_counter()
                training_step(model, batch, optimizer, device=device, distill=distill, size_divisor=32)
                if round_index > 0:
                    times[name].append(time.perf_counter() - tick)
    medians = {name: statistics.median(values) for name, values in times.items()}
    medians["pkd_loss_over_model_only"] = medians["model_plus_pkd_loss"] / medians["model_only"]
    return medians


def bench_read(args, data: Path, stores: dict[str, Path], seconds_per_step: float) -> dict:
    """Samples/s a DataLoader with the default workers delivers from each store (images decoded and
    replayed too, as training needs them; ``images_only`` without a store), vs the student's consumption."""
    consumption = args.batch_size / seconds_per_step
    rates = {}
    for name, path in {"images_only": None, **stores}.items():
        dataset = CocoDetection(data, "train", store_views(next(iter(stores.values()))))
        source = dataset if path is None else (
            StoreStream(dataset, path) if name.startswith("wds") else StoreJoinedDataset(dataset, path))
        sampler = None if name.startswith("wds") else ViewSampler(len(dataset), len(dataset.views), seed=0)
        loader = DataLoader(source, batch_size=args.batch_size, sampler=sampler, collate_fn=collate,
                            num_workers=args.workers)
        tick, count = time.perf_counter(), 0
        for rounds in range(3):  # several epochs: worker start-up is not the rate
            for batch in loader:
                count += len(batch)
        rates[name] = count / (time.perf_counter() - tick)
    stored = {k: v for k, v in rates.items() if k != "images_only"}
    return {"consumption_samples_per_s": consumption, "read_samples_per_s": rates,
            "read_rate_over_consumption": min(stored.values()) / consumption}


def bench_scale(args, work: Path, checkpoint: Path) -> dict:
    """Extraction wall time and peak RSS (fresh process each) at 1x, 2x and 4x the data set size."""
    figures = {}
    for factor in (1, 2, 4):
        data = synth(SynthConfig(out=work / f"scale{factor}", train=args.images * factor, val=2,
                                 image_size=args.image_size, seed=1))
        command = [sys.executable, "-m", "pkd_offline", "extract", "--teacher", "swin", "--checkpoint", str(checkpoint),
                   "--variant", args.variant, "--data", str(data), "--out", str(work / f"scale{factor}.zarr"),
                   "--short-side", str(args.image_size), "--max-size", str(args.image_size), "--codec", STRESS_CODEC,
                   "--views", "2", "--workers", str(args.workers), "--device", args.device, "--no-progress"]
        tick = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - tick
        if status != 0:
            raise RuntimeError(process.stderr.read().decode()[-2000:])
        figures[f"{factor}x"] = {"images": args.images * factor, "seconds": wall,
                                 "seconds_per_image": wall / (args.images * factor),
                                 "peak_rss_mb": usage.ru_maxrss / 1024}
    return figures


def bench_ranks(args, work: Path, checkpoint: Path) -> dict:
    """Whole-command extraction wall time with 1 process and with 2 under torchrun (same data, same store)."""
    data = work / f"scale{4 if (work / 'scale4').exists() else 1}"
    figures = {}
    for nproc in (1, 2):
        launcher = [sys.executable, "-m", "pkd_offline"] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29611",
            "-m", "pkd_offline"]
        command = [*launcher, "extract", "--teacher", "swin", "--checkpoint", str(checkpoint), "--variant", args.variant,
                   "--data", str(data), "--out", str(work / f"ranks{nproc}.zarr"), "--short-side", str(args.image_size),
                   "--max-size", str(args.image_size), "--codec", STRESS_CODEC, "--views", "2", "--workers", "1",
                   "--device", args.device, "--samples-per-shard", "16", "--no-progress", "--overwrite"]
        tick = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        figures[f"{nproc}_process"] = time.perf_counter() - tick
    figures["speedup_2_over_1"] = figures["1_process"] / figures["2_process"]
    return figures


def coco_projection(codecs: dict, levels: dict[str, list[int]], channels: int, coco_channels: int = 256) -> dict:
    """Projected store size (GB) for COCO train2017 (118,287 images, each resized to about 1067x800 px:
    ``COCO_PIXELS``) with a 256-channel FPN teacher, per codec, level set and view count, from the bytes
    per valid input pixel per channel measured here (so padding and zstd are as on the measured set)."""
    projection = {}
    for codec in [name for name, row in codecs.items() if isinstance(row, dict) and "bytes_per_pixel_per_level" in row]:
        per_pixel = codecs[codec]["bytes_per_pixel_per_level"]
        for level_name, strides in levels.items():
            bytes_per_image = sum(per_pixel[s] for s in strides) / channels * coco_channels * COCO_PIXELS
            for views in (1, 2):
                projection[f"{codec} {level_name} views={views}"] = bytes_per_image * views * COCO_TRAIN_IMAGES / 1e9
    return projection


def bench_synth(work: Path) -> dict:
    """Seconds to generate the default synthetic set (``SynthConfig()``: 64 train + 16 val images at 256 px)."""
    tick = time.perf_counter()
    synth(SynthConfig(out=work / "synth-default"))
    return {"default_set_seconds": time.perf_counter() - tick, "images": 80}


def extract_image_counts(text: str) -> tuple[int, int]:
    """``--extract-images SMALL,LARGE``: two image counts, both past the pca fit's samples, SMALL below LARGE."""
    try:
        small, large = (int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SMALL,LARGE (two whole numbers), got {text!r}") from None
    if not FIT_SAMPLES < small < large:
        raise argparse.ArgumentTypeError(f"need {FIT_SAMPLES} < SMALL < LARGE (both runs past the pca fit's "
                                         f"{FIT_SAMPLES} samples), got {text!r}")
    return small, large


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pair", choices=("paper", "tiny"), default="paper",
                        help="paper: Swin-S -> RetinaNet-R50 at full width (the headline); tiny: the stress case")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--student-backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--teacher-checkpoint", default=str(ROOT / "runs" / "teacher" / "model.pt"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--codec", help=f"--pair paper: the stores' codec (default {DEFAULT_CODEC})")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--extract-images", type=extract_image_counts,
                        help="--pair paper: the two extraction runs' image counts, SMALL,LARGE (default 40,72; "
                             "quick 40,56); more images, less noise in the marginal rate")
    args = parser.parse_args()
    args.images, args.steps, args.rounds = (16, 4, 3) if args.quick else (64, 8, 5)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.pair == "paper":
        main_paper(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = synth(SynthConfig(out=work / "data", train=args.images, val=2, image_size=args.image_size, seed=0))
        checkpoint = teacher_checkpoint(args, data, work)
        print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, device {args.device}, "
              f"{args.images} images at {args.image_size} px, student retinanet/{args.student_backbone} {args.variant}")
        codecs = bench_codecs(args, data, checkpoint, work)
        print("\ncodec        bytes/image   x of fp32   min r per level")
        for name, row in codecs.items():
            if isinstance(row, dict):
                r = " ".join(f"P{int(s).bit_length() - 1}:{v:.5f}" for s, v in row.get("min_r_per_level", {}).items())
                print(f"{name:<16} {row['bytes_per_image'] / 1e3:>9.1f} kB  {row['ratio_to_fp32']:>8.3f}   {r}")
        stores = {"zarr_int8": work / f"codec-{STRESS_CODEC}.zarr"}
        stores["wds_int8"] = extract(extract_config(args, data, work / "wds", checkpoint, codec=STRESS_CODEC))
        stores["zarr_fp16"] = work / "codec-fp16.zarr"
        runs = make_runs(args, data, checkpoint, {k: stores[k] for k in ("zarr_int8", "wds_int8")})
        steps = bench_steps(args, runs)
        print("\nstep time (median s, data loading included): " + ", ".join(f"{k} {v:.3f}" for k, v in steps.items()))
        breakdown = bench_breakdown(args, runs)
        print(f"step breakdown on one preloaded batch (median s): {breakdown}")
        del runs
        reads = bench_read(args, data, stores, steps["offline_zarr_int8"])
        print(f"store read rate (samples/s, {args.workers} workers): {reads['read_samples_per_s']}; "
              f"student consumes {reads['consumption_samples_per_s']:.1f}")
        extraction = bench_extraction(args, checkpoint, work)
        print(f"extraction: {extraction}")
        scale = bench_scale(args, work, checkpoint)
        print(f"scale: {scale}")
        ranks = bench_ranks(args, work, checkpoint)
        print(f"extraction, 1 vs 2 processes (torchrun): {ranks}")
        synthetic = bench_synth(work)
        print(f"synthetic data, default set (80 images at 256 px): {synthetic['default_set_seconds']:.2f} s")
        channels = open_store(str(stores["zarr_int8"])).manifest.levels[0].channels
        projection = coco_projection(codecs, {"P2-P5 (index)": [4, 8, 16, 32], "P3-P6 (stride)": [8, 16, 32, 64]},
                                     channels)
        print("COCO train2017 projection (GB): " + ", ".join(f"{k}: {v:.0f}" for k, v in projection.items()))
    offline = max(steps[k] for k in steps if k.startswith("offline_"))
    summary = {
        "step_ratio_offline_over_alone": offline / steps["alone"],
        "step_ratio_online_over_alone": steps["online"] / steps["alone"],
        "extract_ratio_over_forward": extraction["extract_ratio_over_forward"],
        "read_rate_over_consumption": reads["read_rate_over_consumption"],
        "bytes_ratio_default_codec_over_fp32": codecs[DEFAULT_CODEC]["ratio_to_fp32"],
        "min_r_default_codec": min(codecs[DEFAULT_CODEC]["min_r_per_level"].values()),
        "default_codec": DEFAULT_CODEC, "step_seconds": steps, "step_breakdown": breakdown, "extraction": extraction, "read": reads,
        "scale": scale, "ranks": ranks, "synth": synthetic, "coco_projection_gb": projection,
        "codecs": {k: v for k, v in codecs.items() if isinstance(v, dict)},
    }
    print(json.dumps(summary, default=float))


def main_paper(args) -> None:
    """The paper's pair (``benchmarks/paper_pair.py``), at sizes that fit a few minutes on a 2-core CPU."""
    from paper_pair import bench_paper

    args.codec = args.codec or DEFAULT_CODEC
    args.paper_images, args.paper_steps, args.paper_rounds, args.paper_extract_rounds = (
        (4, 2, 2, 1) if args.quick else (8, 3, 3, 2))
    args.paper_extract_images = args.extract_images or ((40, 56) if args.quick else (40, 72))  # past the fit's 32
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, device {args.device}")
    with tempfile.TemporaryDirectory() as tmp:
        summary = bench_paper(args, Path(tmp))
    print(json.dumps(summary, default=float))


if __name__ == "__main__":
    main()
