"""The tiny pair (``benchmarks.pairs.PAIRS["tiny"]``: Swin-T tiny teacher P2..P6 as full maps, RetinaNet-R18 tiny
student, stride pairing), the data path's stress case: codecs' bytes and fidelity, the training step (``benchmarks.
step``), store read rates, extraction against the forward, at 1x/2x/4x the data and with 1 and 2 processes.
Called by ``python -m benchmarks.run --pair tiny``.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.nested_data import added_indices, nested_data
from benchmarks.pairs import Pair, extract_command, extract_config, synthetic_data, train_config
from benchmarks.step import loader_rate, ratio_with_ci
from pkd_offline.checkpoint import save_checkpoint
from pkd_offline.data import CocoDetection
from pkd_offline.precision import forward_autocast
from pkd_offline.store_data import store_views
from pkd_offline.teachers import load_teacher
from pkd_offline.views import make_views
from stages.extract import extract, run_extraction
from storage import describe, open_store

ROOT = Path(__file__).resolve().parents[1]


def teacher_checkpoint(args, pair: Pair, work: Path) -> Path:
    """The demo's trained teacher (``args.teacher_checkpoint``) if present, else a seeded random one of the pair's
    teacher saved as a project checkpoint."""
    if args.teacher_checkpoint and Path(args.teacher_checkpoint).exists():
        return Path(args.teacher_checkpoint)
    teacher, _ = load_teacher(pair.teacher, checkpoint=None, random_init=True, variant=pair.variant, num_classes=7)
    path = work / "random_teacher.pt"
    save_checkpoint(path, {"spec": teacher.spec, "model": teacher.state_dict(), "category_ids": [], "views": []})
    print(f"note: {args.teacher_checkpoint} not found, fidelity measured on a random-init teacher (run dvc repro first)")
    return path


def tiny_extract_config(args, pair: Pair, data: Path, out: Path, checkpoint: Path, **settings):
    return extract_config(pair, data, out, checkpoint=checkpoint, batch_size=8, workers=args.workers,
                          device=args.device, samples_per_shard=64, **settings)


def tiny_train_config(args, pair: Pair, data: Path, checkpoint: Path, mode: str, stores: dict[str, Path]):
    """``mode``: ``alone``, ``offline_<store name>`` or ``online`` (the pair's teacher from ``checkpoint``)."""
    online = {"teacher": pair.teacher, "teacher_checkpoint": checkpoint} if mode == "online" else {}
    return train_config(pair, data, features=stores.get(mode.removeprefix("offline_")), workers=args.workers,
                        device=args.device, **online)


def bench_extraction(args, pair: Pair, checkpoint: Path, work: Path) -> dict:
    """Steady-state images/s of the whole extraction (decode, resize, forward, encode, write) vs the teacher
    forward alone on the same preloaded inputs. The extraction rate is marginal: the samples of a run on 2x the
    images minus a run on 1x (its first half, ``nested_data``) over the difference of their records' seconds; the
    forward alone runs on the images the larger run adds. The ratio's interval is over rounds."""
    device = torch.device(args.device)
    teacher, _ = load_teacher(pair.teacher, checkpoint=checkpoint, random_init=False, variant=pair.variant,
                              num_classes=7)
    teacher.to(device)
    data, double = nested_data(work / "extraction-data", args.images, 2 * args.images, pair.max_size)
    dataset = CocoDetection(double, "train", make_views(pair.views, pair.short_side, pair.max_size))
    extra = added_indices(dataset, data)
    batches = [[dataset[(i, v)] for i in extra[start:start + 4] for v in range(pair.views)]
               for start in range(0, len(extra), 4)]
    with torch.inference_mode(), forward_autocast(device):  # warm-up: the first forward of each size picks kernels
        teacher.features([item["image"].to(device) for item in batches[0]])
    forward, whole = [], []
    for _ in range(args.rounds):
        tick = time.perf_counter()
        with torch.inference_mode(), forward_autocast(device):
            for batch in batches:
                features, _ = teacher.features([item["image"].to(device) for item in batch])
                features[4].float().sum().item()
        forward.append(sum(len(b) for b in batches) / (time.perf_counter() - tick))
        records = [run_extraction(tiny_extract_config(args, pair, source, work / name, checkpoint))
                   for source, name in ((data, "x1.zarr"), (double, "x2.zarr"))]
        whole.append((records[1].samples - records[0].samples) / max(records[1].seconds - records[0].seconds, 1e-9))
    ratio, interval = ratio_with_ci(whole, forward)
    return {"extract_img_per_s": statistics.median(whole), "forward_img_per_s": statistics.median(forward),
            "extract_ratio_over_forward": ratio, "extract_ratio_over_forward_ci95": interval}


def bench_codecs(args, pair: Pair, data: Path, checkpoint: Path, work: Path) -> dict:
    """Bytes per image per level and Pearson r (decoded vs fp32) per level, per codec and a by-hand baseline."""
    stores = {codec: extract(tiny_extract_config(args, pair, data, work / f"codec-{codec}.zarr", checkpoint,
                                                 codec=codec)) for codec in ("fp32", "fp16", "int8", "pca")}
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


def bench_read(args, pair: Pair, data: Path, checkpoint: Path, stores: dict[str, Path], seconds_per_step: float
               ) -> dict:
    """Samples/s the training loader delivers from each store over three epochs (images decoded and replayed
    too, as training needs them; ``images_only`` without a store), vs the student's consumption."""
    samples = 3 * len(CocoDetection(data, "train", store_views(next(iter(stores.values())))))
    rates = {name: loader_rate(tiny_train_config(args, pair, data, checkpoint, mode, stores),
                               next(iter(stores.values())), samples)
             for name, mode in [("images_only", "alone"), *((name, f"offline_{name}") for name in stores)]}
    consumption = pair.batch_size / seconds_per_step
    stored = {k: v for k, v in rates.items() if k != "images_only"}
    return {"consumption_samples_per_s": consumption, "read_samples_per_s": rates,
            "read_rate_over_consumption": min(stored.values()) / consumption}


def run_cli_extract(cfg, work: Path, name: str, launcher: list[str]) -> tuple[float, dict, float]:
    """``extract`` of ``cfg`` as a fresh process under ``launcher``: (wall seconds, its record, peak RSS MB)."""
    command, record = extract_command(cfg, work, name)
    tick = time.perf_counter()
    process = subprocess.Popen([*launcher, *command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - tick
    if status != 0:
        raise RuntimeError(process.stderr.read().decode()[-2000:])
    return wall, json.loads(record.read_text()), usage.ru_maxrss / 1024


def bench_scale(args, pair: Pair, work: Path, checkpoint: Path) -> dict:
    """Extraction wall time, its record's seconds and peak RSS (fresh process each) at 1x, 2x and 4x the data."""
    figures = {}
    for factor in (1, 2, 4):
        data = synthetic_data(work / f"scale{factor}", args.images * factor, pair.max_size, seed=1)
        cfg = tiny_extract_config(args, pair, data, work / f"scale{factor}.zarr", checkpoint)
        wall, record, rss = run_cli_extract(cfg, work, f"scale{factor}", [sys.executable, "-m", "pkd_offline"])
        figures[f"{factor}x"] = {"images": args.images * factor, "seconds": wall, "record_seconds": record["seconds"],
                                 "seconds_per_image": wall / (args.images * factor), "peak_rss_mb": rss}
    return figures


def bench_ranks(args, pair: Pair, work: Path, checkpoint: Path) -> dict:
    """Whole-command extraction wall time with 1 process and with 2 under torchrun (same data, same store)."""
    data = work / f"scale{4 if (work / 'scale4').exists() else 1}"
    figures = {}
    for nproc in (1, 2):
        launcher = [sys.executable, "-m", "pkd_offline"] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29611",
            "-m", "pkd_offline"]
        cfg = tiny_extract_config(args, pair, data, work / f"ranks{nproc}.zarr", checkpoint, workers=1,
                                  samples_per_shard=16)
        figures[f"{nproc}_process"] = run_cli_extract(cfg, work, f"ranks{nproc}", launcher)[0]
    figures["speedup_2_over_1"] = figures["1_process"] / figures["2_process"]
    return figures


def bench_synth(work: Path) -> dict:
    """Seconds to generate the default synthetic set (``SynthConfig()``: 64 train + 16 val images at 256 px)."""
    from stages.synth import SynthConfig, synth

    tick = time.perf_counter()
    synth(SynthConfig(out=work / "synth-default"))
    return {"default_set_seconds": time.perf_counter() - tick, "images": 80}
