"""The GPU check: the CUDA path end to end, timed, in one run that ends with one JSON line.

    bash benchmarks/gpu_check.sh                       # on a GPU node (installs from .whl/ first)
    python benchmarks/gpu_check.py --device cpu --quick  # the same sections, small, on a CPU

Sections (each fails soft: its error goes to ``errors[section]`` and the next one runs):
synth (the project's generator, COCO-size images), extract (the CLI: Swin-S teacher, P2..P5, the default
codec and layout or ``--codec``/``--layout``, zarr and WebDataset; its steady rate), forward (the teacher alone on preloaded inputs), verify (the
CLI, on the device), steps (RetinaNet-R50 alone, offline from each store, online with the teacher:
median step time and peak GPU memory), read (store read rate vs the student's consumption), loss
(offline loss == online loss on a batch of equal-size images), torchrun (extract and train under
``torchrun --nproc_per_node 1``: nccl on CUDA, gloo on CPU), batch (extraction's per-batch path piece by piece,
and where its launching part waits for the device). See docs/gpu.md for every key.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pkd_offline.data import CocoDetection, ViewSampler, collate  # noqa: E402
from pkd_offline.distributed import Ranks  # noqa: E402
from pkd_offline.engine import distillation_loss, training_step  # noqa: E402
from pkd_offline.models import build_detector  # noqa: E402
from stages.extract import default_writer_threads, teacher_autocast  # noqa: E402
from stages.store_data import StoreJoinedDataset, store_views  # noqa: E402
from stages.teachers import load_teacher  # noqa: E402
from stages.train import TrainConfig, build_optimizer, setup_distillation  # noqa: E402
from storage import CODECS, describe, open_store  # noqa: E402

# Offline and online PKD losses on the same batch may differ by the teacher's bf16 rounding (batch
# composition changes kernels) and the store's codec (fp16: 2^-11 relative; int8: 1/255 of a
# channel's range); both are far below this relative tolerance.
LOSS_REL_TOLERANCE = 1e-3


@dataclass
class Sizes:
    """How big the check runs: ``images`` in the training store (half of them for the torchrun check),
    synthetic images of ``image_size`` px long side, views resized to ``short_side``/``max_size`` px, ``steps`` timed training steps per mode after ``warmup``."""

    images: int
    image_size: int
    short_side: int
    max_size: int
    variant: str
    batch_size: int
    extract_batch_size: int
    warmup: int
    steps: int
    forward_rounds: int
    verify_samples: int
    torchrun_iters: int
    backbone: str
    budget_seconds: int  # sections not started by then are skipped, so the JSON line always comes
    samples_per_shard: int  # store shards >= loader workers, so every worker streams and writes overlap forwards


FULL = Sizes(images=48, image_size=1333, short_side=800, max_size=1333, variant="full", batch_size=2,
             extract_batch_size=8, warmup=3, steps=15, forward_rounds=3, verify_samples=3, torchrun_iters=3,
             backbone="resnet50", budget_seconds=330, samples_per_shard=4)
QUICK = Sizes(images=8, image_size=160, short_side=128, max_size=160, variant="tiny", batch_size=2,
              extract_batch_size=4, warmup=1, steps=3, forward_rounds=2, verify_samples=2, torchrun_iters=2,
              backbone="resnet18", budget_seconds=600, samples_per_shard=4)
TEACHER, STUDENT, LEVELS, LEVEL_MAP = "swin_s", "retinanet", "2,3,4,5", "index"
START = time.perf_counter()
DEADLINE = [START + 600.0]  # subprocesses are killed past it (set from the budget in main)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - START:6.1f}s] {message}", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def cli(args: list[str], *, torchrun: bool = False) -> tuple[float, str, str]:
    """Run ``python -m pkd_offline ARGS`` (under ``torchrun --nproc_per_node 1`` if asked): (wall
    seconds, stdout, stderr). A non-zero exit (but verify's 1, a failed check) raises with its stderr's end."""
    launcher = [sys.executable, "-m", "pkd_offline"]
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr",
                    "127.0.0.1", "--master_port", str(free_port()), "-m", "pkd_offline"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    tick = time.perf_counter()
    # Its own process group, so a hung run (torchrun and its workers) is killed whole at the deadline.
    process = subprocess.Popen([*launcher, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               cwd=ROOT, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=max(30.0, DEADLINE[0] - time.perf_counter()))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.communicate()
        raise RuntimeError(f"{' '.join(args[:2])} still running at the time budget's end: killed") from None
    seconds = time.perf_counter() - tick
    if process.returncode not in (0, 1) or (process.returncode == 1 and args[0] != "verify"):
        raise RuntimeError(f"exit {process.returncode}: {' '.join(args[:2])}: {stderr.strip()[-1500:]}")
    return seconds, stdout, stderr


EXTRACT_RATE = re.compile(r"extract: (\d+) samples in ([0-9.]+) s from the first batch")
EXTRACT_PHASE = re.compile(r"(\w+) ([0-9.]+) s")  # "name seconds s" pairs of the "extract phases:" line


def extract_args(args, sizes: Sizes, data: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "--teacher", TEACHER, "--variant", sizes.variant, "--random-init", "--data", str(data),
            "--out", str(out), "--levels", LEVELS, "--short-side", str(sizes.short_side), "--max-size",
            str(sizes.max_size), "--batch-size", str(sizes.extract_batch_size), "--workers", str(args.workers),
            "--samples-per-shard", str(sizes.samples_per_shard), *store_args(args),
            "--device", args.device, "--no-progress", "--overwrite", *extra]


def store_args(args) -> list[str]:
    """``extract`` flags for ``--codec`` and ``--layout`` (none: the defaults); a projected store serves
    RetinaNet's P3..P6 (the index pairing of teacher P2..P5)."""
    flags = ["--codec", args.codec] if args.codec else []
    if args.layout == "projected":
        flags += ["--layout", "projected", "--student-levels", "3,4,5,6"]
    return flags


def section_synth(args, sizes: Sizes, work: Path, result: dict) -> None:
    for name, count in (("data", sizes.images), ("half", sizes.images // 2)):
        cli(["data", "synth", "--out", str(work / name), "--train", str(count), "--val", "2", "--image-size",
             str(sizes.image_size), "--seed", "0"])
    dataset = CocoDetection(work / "data", "train", [])
    result["synth"] = {"images": sizes.images, "original_hw": dict(Counter(
        "x".join(map(str, dataset.original_hw(i))) for i in dataset.image_ids))}


def section_extract(args, sizes: Sizes, work: Path, result: dict) -> None:
    """Whole-command seconds and the steady rate of ``extract`` into zarr and into WebDataset: samples per
    second from the first batch to the last shard written (the command's own summary line), so start-up
    (imports, model build, CUDA init, workers) is left out and encoding and writing are in. Also zarr on the half
    set (the marginal rate) and, on CUDA, both zarr runs with ``--no-cuda-graphs`` (``zarr_eager``: the teacher
    launched kernel by kernel), side by side."""
    images = {"data": sizes.images, "half": sizes.images // 2}  # section_synth's two sets
    seconds, steady, phases, graphs = {}, {}, {}, {}  # steady: name -> (samples, seconds) of the summary line
    runs = [("zarr", "data", work / "f.zarr", ()), ("wds", "data", work / "wds", ("--format", "wds")),
            ("zarr_half", "half", work / "half_f.zarr", ())]
    if args.device == "cuda":
        runs += [("zarr_eager", "data", work / "eager.zarr", ("--no-cuda-graphs",)),
                 ("zarr_eager_half", "half", work / "half_eager.zarr", ("--no-cuda-graphs",))]
    for name, data, out, extra in runs:
        seconds[name], _, stderr = cli(extract_args(args, sizes, work / data, out, *extra))
        match = EXTRACT_RATE.search(stderr)
        steady[name] = (int(match.group(1)), float(match.group(2))) if match else None
        phase_line = next((line for line in stderr.splitlines() if line.startswith("extract phases:")), "")
        phases[name] = {phase: float(value) for phase, value in EXTRACT_PHASE.findall(phase_line)}
        graphs[name] = next((line.split("extract: ", 1)[1] for line in stderr.splitlines()
                             if line.startswith("extract: cuda graphs")), None)
        rate = steady[name][0] / steady[name][1] if steady[name] else 0.0
        log(f"  extract {name} {images[data]} images: {seconds[name]:.1f} s, steady {rate:.1f} img/s"
            f"{'; ' + graphs[name] if graphs[name] else ''}")
    rates = {name: value[0] / value[1] if value else None for name, value in steady.items()}
    summaries = {name: describe(open_store(str(work / name)), digest=False) for name in ("f.zarr", "wds")}
    # The marginal rate: the samples of the whole set beyond the half set over the steady seconds they added,
    # so what every run pays once (the fit, kernel selection, the last shards) drops out, as on a COCO-size run.
    marginal = {}
    for name, half in (("zarr", "zarr_half"), ("zarr_eager", "zarr_eager_half")):
        if steady.get(name) and steady.get(half) and steady[name][1] > steady[half][1]:
            marginal[name] = (steady[name][0] - steady[half][0]) / (steady[name][1] - steady[half][1])
    result["extract"] = {"seconds": seconds, "img_per_s_steady": {"zarr": rates["zarr"], "wds": rates["wds"]},
                         "img_per_s_steady_all": rates, "img_per_s_marginal": marginal,
                         "img_per_s_steady_without_graphs": rates.get("zarr_eager"), "cuda_graphs": graphs,
                         "phase_seconds": phases,
                         "img_per_s_whole_command": {name: images[data] / seconds[name] for name, data, _, _ in runs},
                         "writer_threads": default_writer_threads(), "codec": summaries["f.zarr"]["codec"],
                         "store_bytes_per_image": {"zarr": summaries["f.zarr"]["bytes_per_image"],
                                                   "wds": summaries["wds"]["bytes_per_image"]}}


def teacher_and_batches(sizes: Sizes, work: Path, device: torch.device) -> tuple[torch.nn.Module, list[list[dict]]]:
    """The check's teacher on ``device`` and the training images' first views (dataset items, on the host) in
    batches as extract makes them: one padded size each, at most ``extract_batch_size``."""
    dataset = CocoDetection(work / "data", "train", store_views(work / "f.zarr"))
    teacher, _ = load_teacher(TEACHER, checkpoint=None, random_init=True, variant=sizes.variant,
                              num_classes=dataset.num_classes)
    teacher.to(device)
    groups: dict[tuple, list] = {}
    for i in range(len(dataset)):
        item = dataset[(i, 0)]
        groups.setdefault(tuple(item["image"].shape), []).append(item)
    return teacher, [g[k:k + sizes.extract_batch_size] for g in groups.values()
                     for k in range(0, len(g), sizes.extract_batch_size)]


def section_forward(args, sizes: Sizes, work: Path, result: dict) -> None:
    """Teacher backbone+FPN alone on inputs already on the device, batched as extract batches them
    (same padded size, ``extract_batch_size``), in the precision extract uses; images/s launched kernel by
    kernel (``forward``, the reference of ``extract_ratio_over_forward``) and, on CUDA, replayed from a graph
    per batch shape as extract runs it (``forward_graphed``, captured in the warm-up round)."""
    from pkd_offline.graphed_forward import graphed_backbone

    device = torch.device(args.device)
    teacher, item_batches = teacher_and_batches(sizes, work, device)
    batches = [[item["image"].to(device) for item in items] for items in item_batches]
    strides = [2 ** int(level) for level in LEVELS.split(",")]
    modes = {"forward": None}
    if device.type == "cuda":
        modes["forward_graphed"] = graphed_backbone(teacher, device)
    for mode, backbone in modes.items():
        rates = []
        for round_index in range(sizes.forward_rounds + 1):
            synchronize(device)
            tick = time.perf_counter()
            with torch.inference_mode(), teacher_autocast(device):
                for batch in batches:
                    features, _ = teacher.features(batch, backbone)
                    for s in strides:
                        features[s].float()
            synchronize(device)
            if round_index > 0:  # round 0 warms up kernels and the allocator (and captures the graphs)
                rates.append(sum(map(len, batches)) / (time.perf_counter() - tick))
        result[mode] = {"img_per_s": statistics.median(rates), "rounds": rates}
        log(f"  {mode}: {result[mode]['img_per_s']:.1f} img/s")
    steady = result.get("extract", {}).get("img_per_s_steady", {})
    if steady and all(steady.values()):
        per_format = {name: rate / result["forward"]["img_per_s"] for name, rate in steady.items()}
        result["extract_ratio_over_forward_per_format"] = per_format
        result["extract_ratio_over_forward"] = min(per_format.values())
        if "forward_graphed" in result:
            result["extract_ratio_over_graphed_forward"] = min(steady.values()) / result["forward_graphed"]["img_per_s"]
        eager = result["extract"].get("img_per_s_steady_without_graphs")
        if eager:
            result["extract_ratio_without_graphs_over_forward"] = eager / result["forward"]["img_per_s"]
        result["extract_marginal_ratio_over_forward"] = {
            name: rate / result["forward"]["img_per_s"] for name, rate in result["extract"]["img_per_s_marginal"].items()}


def section_verify(args, sizes: Sizes, work: Path, result: dict) -> None:
    seconds, stdout, _ = cli(["verify", str(work / "f.zarr"), "--data", str(work / "data"), "--samples",
                           str(sizes.verify_samples), "--device", args.device, "--json", "--no-progress"])
    report = json.loads(stdout)
    result["verify"] = {"ok": report["ok"], "seconds": seconds, "threshold": report["threshold"],
                        "levels": report["levels"], "shard_problems": report["shard_problems"]}
    if not report["ok"]:
        raise RuntimeError(f"verify FAILED: {report['text'].splitlines()[-1]}")


def train_config(args, sizes: Sizes, work: Path, mode: str) -> TrainConfig:
    extra = {"features": str(work / "f.zarr")} if mode == "offline_zarr" else {"features": str(work / "wds")} \
        if mode == "offline_wds" else {"teacher": TEACHER, "random_init": True} if mode == "online" else {}
    return TrainConfig(student=STUDENT, backbone=sizes.backbone, variant=sizes.variant, data=work / "data",
                       batch_size=sizes.batch_size, workers=args.workers, device=args.device, lr=0.002,
                       level_map=LEVEL_MAP, short_side=sizes.short_side, max_size=sizes.max_size, views=1,
                       **extra)


def build_run(cfg: TrainConfig, device: torch.device, store: Path):
    """Model, loader (as ``stages.train.train`` builds it, persistent workers), optimizer, Distillation."""
    torch.manual_seed(cfg.seed)
    dataset = CocoDetection(cfg.data, cfg.split, store_views(store))
    model = build_detector(cfg.student, num_classes=dataset.num_classes, variant=cfg.variant, backbone=cfg.backbone)
    train_set, distill = setup_distillation(cfg, dataset, model, device, Ranks())
    model.to(device)
    streaming = isinstance(train_set, torch.utils.data.IterableDataset)
    sampler = train_set if streaming else ViewSampler(len(dataset), len(dataset.views), seed=cfg.seed)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=None if streaming else sampler,
                        collate_fn=collate, num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed))
    return model, loader, sampler, build_optimizer(cfg, model), distill


def batches_forever(loader, sampler):
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def time_mode(args, sizes: Sizes, work: Path, mode: str, device: torch.device) -> tuple[float, float, float | None]:
    """(median step seconds, last loss, peak GPU GB or None) of ``mode``; its models die with this frame."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, loader, sampler, optimizer, distill = build_run(train_config(args, sizes, work, mode), device, work / "f.zarr")
    batches, times = batches_forever(loader, sampler), []
    for step in range(sizes.warmup + sizes.steps):
        synchronize(device)
        tick = time.perf_counter()
        terms = training_step(model, next(batches), optimizer, device=device, distill=distill, size_divisor=32)
        synchronize(device)
        if step >= sizes.warmup:
            times.append(time.perf_counter() - tick)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return statistics.median(times), terms["loss"], peak


def section_steps(args, sizes: Sizes, work: Path, result: dict) -> None:
    """Median seconds per training step (data loading included) and peak GPU memory, one mode at a
    time (each mode's models alone on the device; the peak is reset before each is built)."""
    device = torch.device(args.device)
    steps, memory, losses, errors = {}, {}, {}, {}
    for mode in ("alone", "offline_zarr", "offline_wds", "online"):
        if time.perf_counter() > DEADLINE[0]:
            errors[mode] = "skipped: time budget spent"
            continue
        log(f"  steps: {mode}")
        try:
            steps[mode], losses[mode], memory[mode] = time_mode(args, sizes, work, mode, device)
        except Exception as error:  # one mode failing leaves the others measured
            errors[mode] = f"{type(error).__name__}: {str(error)[-800:]}"
            log(f"  steps: {mode} FAILED: {errors[mode]}")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["step_seconds"], result["peak_gpu_memory_gb"], result["last_step_loss"] = steps, memory, losses
    per_format = {m.removeprefix("offline_"): steps[m] / steps["alone"] for m in steps if m.startswith("offline_")
                  and "alone" in steps}
    result["step_ratio_offline_over_alone_per_format"] = per_format
    if len(per_format) == 2:
        result["step_ratio_offline_over_alone"] = max(per_format.values())
    if "online" in steps and "alone" in steps:
        result["step_ratio_online_over_alone"] = steps["online"] / steps["alone"]
    if errors:
        raise RuntimeError("; ".join(f"{m}: {e}" for m, e in errors.items()))


def section_read(args, sizes: Sizes, work: Path, result: dict) -> None:
    """Samples/s the training loader (same workers, batch size and pinning) delivers from each store, images
    decoded and teacher maps as training gets them (decoded in the workers on a CPU, as stored on CUDA, where
    the device decodes them in the step); clocked from the first batch over two more epochs, so worker
    start-up is not the rate. The student consumes batch_size / (step alone) samples/s."""
    rates = {}
    for name, store in (("images_only", None), ("zarr", work / "f.zarr"), ("wds", work / "wds")):
        mode = "alone" if store is None else f"offline_{name}"
        cfg = train_config(args, sizes, work, mode)
        dataset = CocoDetection(cfg.data, cfg.split, store_views(work / "f.zarr"))
        model = build_detector(STUDENT, num_classes=dataset.num_classes, variant=sizes.variant, backbone=sizes.backbone)
        source, _ = setup_distillation(cfg, dataset, model, torch.device(args.device), Ranks())
        streaming = isinstance(source, torch.utils.data.IterableDataset)
        sampler = source if streaming else ViewSampler(len(dataset), len(dataset.views), seed=0)
        loader = DataLoader(source, batch_size=sizes.batch_size, sampler=None if streaming else sampler,
                            collate_fn=collate, num_workers=args.workers, persistent_workers=args.workers > 0,
                            pin_memory=args.device == "cuda")
        batches, count = batches_forever(loader, sampler), 0
        next(batches)
        tick = time.perf_counter()
        while count < 2 * len(dataset):
            count += len(next(batches))
        rates[name] = count / (time.perf_counter() - tick)
        del batches, loader
    result["read_samples_per_s"] = rates
    if "alone" in result.get("step_seconds", {}):
        consumption = sizes.batch_size / result["step_seconds"]["alone"]
        result["consumption_samples_per_s"] = consumption
        result["read_rate_over_consumption"] = min(rates["zarr"], rates["wds"]) / consumption


def section_loss(args, sizes: Sizes, work: Path, result: dict) -> None:
    """On a batch of equal-size images: the PKD loss from each store vs from the teacher online, on the
    same student features (one forward, no step), in training's precision (bf16 autocast on CUDA)."""
    device = torch.device(args.device)
    figures = {}
    student_features = None
    for mode in ("online", "offline_zarr", "offline_wds"):
        cfg = train_config(args, sizes, work, mode)
        dataset = CocoDetection(cfg.data, cfg.split, store_views(work / "f.zarr"))
        if student_features is None:
            sizes_seen = Counter(dataset.original_hw(i) for i in dataset.image_ids)
            common = sizes_seen.most_common(1)[0][0]
            chosen = [i for i, image_id in enumerate(dataset.image_ids) if dataset.original_hw(image_id) == common]
            chosen = chosen[: max(2, sizes.batch_size)]
            torch.manual_seed(0)
            model = build_detector(STUDENT, num_classes=dataset.num_classes, variant=sizes.variant,
                                   backbone=sizes.backbone).to(device)
            model.train()
            batch = [dataset[(i, 0)] for i in chosen]
            images = [item["image"].to(device) for item in batch]
            targets = [{k: v.to(device) for k, v in item["target"].items()} for item in batch]
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                _, student_features = model(images, targets)
        source, distill = setup_distillation(cfg, dataset, model, device, Ranks())
        joined = StoreJoinedDataset(dataset, cfg.features, keep_encoded=device.type == "cuda")  # as training reads
        items = batch if mode == "online" else [joined[(i, 0)] for i in chosen]
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            figures[mode] = float(distillation_loss(student_features, items, images, distill, 32, device))
    diffs = {m.removeprefix("offline_"): abs(figures[m] - figures["online"]) / abs(figures["online"])
             for m in ("offline_zarr", "offline_wds")}
    result["loss_check"] = {"images": len(chosen), "image_hw": list(batch[0]["image_hw"]), "loss": figures,
                            "rel_diff": diffs, "tolerance": LOSS_REL_TOLERANCE}
    result["offline_online_loss_rel_diff"] = max(diffs.values())
    if result["offline_online_loss_rel_diff"] > LOSS_REL_TOLERANCE:
        raise RuntimeError(f"offline vs online PKD loss differ by {result['offline_online_loss_rel_diff']:.3g} "
                           f"(tolerance {LOSS_REL_TOLERANCE})")


def section_torchrun(args, sizes: Sizes, work: Path, result: dict) -> None:
    """``torchrun --nproc_per_node 1``: extract (half the images) and a few offline training steps."""
    cli(extract_args(args, sizes, work / "half", work / "half.zarr"))
    seconds = {"extract": cli(extract_args(args, sizes, work / "half", work / "torchrun.zarr"), torchrun=True)[0]}
    digests = [describe(open_store(str(work / name)))["digest"] for name in ("half.zarr", "torchrun.zarr")]
    run = work / "torchrun_run"
    seconds["train"] = cli(["train", "--student", STUDENT, "--backbone", sizes.backbone, "--variant", sizes.variant,
                            "--data", str(work / "data"), "--features", str(work / "f.zarr"), "--level-map", LEVEL_MAP,
                            "--out", str(run), "--iters", str(sizes.torchrun_iters), "--batch-size",
                            str(sizes.batch_size), "--workers", "2", "--lr", "0.002", "--device", args.device,
                            "--no-progress"], torchrun=True)[0]
    log_lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    if [r["iter"] for r in log_lines] != list(range(1, sizes.torchrun_iters + 1)):
        raise RuntimeError(f"torchrun train logged iterations {[r['iter'] for r in log_lines]}")
    result["torchrun"] = {"backend": "nccl" if args.device.startswith("cuda") else "gloo", "seconds": seconds,
                          "store_digest_equal_to_single_process": digests[0] == digests[1] and digests[0] is not None,
                          "train_losses": [r["loss"] for r in log_lines]}


def section_batch(args, sizes: Sizes, work: Path, result: dict) -> None:
    """Extraction's per-batch path, piece by piece, waiting for the device after each (ms per batch of
    ``extract_batch_size``, medians over the batches of two rounds after a warm-up one): the images' copy to the
    device, the teacher forward alone, ``teacher_levels`` whole (copy, forward, projections and checks), and
    ``launch_encode`` + ``finish`` (encoding and the copy to the host). On CUDA also where the launching part
    (``teacher_levels``, ``launch_encode``) waits for the device, from torch's sync debug mode: the project's
    source lines that did (none: the host can run a batch ahead of the device)."""
    import warnings

    from stages.extract import finish, launch_encode, teacher_levels
    from pkd_offline.stored_maps import device_basis
    from storage.codecs import needs_basis
    from storage.pca_basis import read_side
    from storage.store import existing_side

    device = torch.device(args.device)
    manifest = open_store(str(work / "f.zarr")).manifest
    strides = list(manifest.strides)
    projected = frozenset(t for s, t in manifest.layout.get("pairs", []) if t in manifest.layout.get("projected", []))
    bases = {}
    if needs_basis(manifest.codec):
        side = read_side(existing_side(str(work / "f.zarr")), {level.stride: level.channels for level in manifest.levels},
                         "the check's store")
        bases = {stride: device_basis(basis, device) for stride, basis in side.items()}
    teacher, batches = teacher_and_batches(sizes, work, device)
    if device.type == "cuda":
        for item in (item for batch in batches for item in batch):
            item["image"] = item["image"].pin_memory()
    times: dict[str, list[float]] = {"copy": [], "forward": [], "teacher_levels": [], "encode_and_finish": []}
    backbones = {"": None}  # timing-name suffix -> the teacher's backbone stand-in (None: its own)
    if device.type == "cuda":  # as extract runs the teacher: one graph per batch shape
        from pkd_offline.graphed_forward import graphed_backbone

        backbones["_graphed"] = graphed_backbone(teacher, device)
        times.update(forward_graphed=[], teacher_levels_graphed=[])
    graph_differences = []  # max |graphed - eager| over a batch's stored levels

    def timed(name: str | None, work_to_time):
        synchronize(device)
        tick = time.perf_counter()
        value = work_to_time()
        synchronize(device)
        if name:
            times[name].append(1000 * (time.perf_counter() - tick))
        return value

    for round_index in range(3):
        for batch in batches:
            keep = (lambda name: name) if round_index else (lambda name: None)  # round 0 warms up
            images = timed(keep("copy"), lambda: [item["image"].to(device, non_blocking=True) for item in batch])
            levels = {}
            for suffix, backbone in backbones.items():
                with torch.inference_mode(), teacher_autocast(device):
                    timed(keep("forward" + suffix), lambda: teacher.features(images, backbone))
                levels[suffix] = timed(keep("teacher_levels" + suffix),
                                       lambda: teacher_levels(teacher, batch, strides, device, projected, backbone))
            maps = levels[""]
            if "_graphed" in levels:
                graph_differences.append(max(float((a - b).abs().max()) for s in strides for (_, a), (_, b)
                                             in zip(maps.levels[s], levels["_graphed"].levels[s])))
            timed(keep("encode_and_finish"), lambda: finish(launch_encode(batch, maps, strides, manifest.codec, bases),
                                                            manifest.n_views))
    waits: Counter = Counter()
    if device.type == "cuda":
        def note(message, category, filename, lineno, file=None, line=None):
            import traceback as tb
            if str(message).startswith("Synchronization debug mode is a prototype"):
                return  # torch's notice on switching the mode on, not a wait
            ours = [frame for frame in tb.extract_stack()[:-1] if str(ROOT) in frame.filename
                    and "benchmarks" not in frame.filename]
            where = f"{Path(ours[-1].filename).relative_to(ROOT)}:{ours[-1].lineno}" if ours else f"{filename}:{lineno}"
            waits[f"{where} ({str(message)[:60]})"] += 1

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = note
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for batch in batches[:2]:
                    launched = launch_encode(batch, teacher_levels(teacher, batch, strides, device, projected),
                                             strides, manifest.codec, bases)
                    torch.cuda.set_sync_debug_mode(0)
                    finish(launched, manifest.n_views)
                    torch.cuda.set_sync_debug_mode("warn")
            finally:
                torch.cuda.set_sync_debug_mode(0)
    result["batch_path"] = {"images_per_batch": [len(b) for b in batches], "codec": manifest.codec,
                            "projected": sorted(projected),
                            "ms_per_batch": {name: statistics.median(values) for name, values in times.items()},
                            "launch_waits_for_device": dict(waits) if device.type == "cuda" else None,
                            "graphed_max_abs_difference": max(graph_differences) if graph_differences else None,
                            "graphs_captured": backbones["_graphed"].captures if "_graphed" in backbones else None}


def section_cuda_tests(args, sizes: Sizes, work: Path, result: dict) -> None:
    """The test files that need a GPU (skipped without one), run here by pytest: its summary line and exit code."""
    files = ["tests/test_graphed_forward.py"]
    process = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files], cwd=ROOT,
                             capture_output=True, text=True, timeout=max(30.0, DEADLINE[0] - time.perf_counter()))
    lines = process.stdout.strip().splitlines()
    result["cuda_tests"] = {"files": files, "exit_code": process.returncode, "summary": lines[-1] if lines else "",
                            "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))]}
    log(f"  pytest {' '.join(files)}: {result['cuda_tests']['summary']}")
    if process.returncode != 0:
        print(process.stdout[-4000:], process.stderr[-2000:], file=sys.stderr)


SECTIONS = {"synth": section_synth, "extract": section_extract, "forward": section_forward, "verify": section_verify,
            "steps": section_steps, "read": section_read, "loss": section_loss, "torchrun": section_torchrun,
            "batch": section_batch, "cuda_tests": section_cuda_tests}


def environment(args) -> dict:
    from importlib import metadata

    versions = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("torchvision", "numpy", "zarr", "numcodecs", "webdataset", "pycocotools", "google-crc32c",
                 "typing-extensions", "packaging"):  # zarr needs typing-extensions >= 4.12, packaging >= 22
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # reported, not fatal: the sections that need it fail on their own
            versions[name] = "missing"
    cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "cuda": torch.version.cuda if cuda else None,
            "cpus": os.cpu_count(), "versions": versions}


def default_workers() -> tuple[int, float | None]:
    """DataLoader workers: half the CPUs, at most 8, fewer where /dev/shm is small (workers hand
    tensors over in shared memory: a COCO-size sample's P2..P5 maps are about 73 MB as float32)."""
    workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    try:
        shm_gb = shutil.disk_usage("/dev/shm").free / 1e9
    except OSError:
        return workers, None
    return (0 if shm_gb < 1 else min(workers, 2) if shm_gb < 6 else workers), shm_gb


def run_check(args, sizes: Sizes) -> dict:
    """Run the sections in ``args.only`` (all by default) and return the result dict (the JSON line)."""
    shm_gb = None
    if args.workers is None:
        args.workers, shm_gb = default_workers()
    result: dict = {**environment(args), "quick": args.quick, "sizes": vars(sizes), "workers": args.workers,
                    "shm_free_gb": shm_gb, "teacher": TEACHER, "student": f"{STUDENT}/{sizes.backbone}",
                    "levels": LEVELS, "level_map": LEVEL_MAP, "codec_flag": args.codec, "layout": args.layout,
                    "errors": {}, "section_seconds": {}}
    if os.environ.get("PKD_INSTALL_SECONDS"):
        result["install_seconds"] = float(os.environ["PKD_INSTALL_SECONDS"])
    for key in ("extract_ratio_over_forward", "step_ratio_offline_over_alone", "step_ratio_online_over_alone",
                "read_rate_over_consumption", "offline_online_loss_rel_diff"):
        result[key] = None
    log(f"gpu check on {result['device']} ({result['cpus']} CPUs, {args.workers} loader workers), torch "
        f"{torch.__version__}, {'quick' if args.quick else 'full'} sizes {vars(sizes)}")
    wanted = args.only.split(",") if args.only else list(SECTIONS)
    DEADLINE[0] = START + sizes.budget_seconds + 60
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in wanted:
            if time.perf_counter() - START > sizes.budget_seconds:
                result["errors"][name] = f"skipped: the {sizes.budget_seconds} s budget was spent"
                log(f"section {name} skipped (budget)")
                continue
            log(f"section {name}")
            tick = time.perf_counter()
            try:
                SECTIONS[name](args, sizes, work, result)
            except Exception as error:  # fail soft: record and go on
                result["errors"][name] = f"{type(error).__name__}: {str(error)[-1500:]}"
                traceback.print_exc()
                log(f"section {name} FAILED: {result['errors'][name]}")
            gc.collect()  # the next section (or a child process) gets the device memory back
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            result["section_seconds"][name] = round(time.perf_counter() - tick, 1)
            log(f"section {name} done in {result['section_seconds'][name]} s")
    result["total_seconds"] = round(time.perf_counter() - START, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="small sizes and tiny variants (a CPU smoke run)")
    parser.add_argument("--out", help="folder for gpu_check.json (default: $OUT if set)")
    parser.add_argument("--work", help="scratch folder (default: a temporary one, removed at the end)")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: half the CPUs, at most 8)")
    parser.add_argument("--only", help="comma-separated sections to run, in order (default: all)")
    parser.add_argument("--codec", choices=sorted(CODECS), help="store codec (default: extract's default)")
    parser.add_argument("--layout", choices=("full", "projected"), default="full",
                        help="store layout (default: full; projected stores P2..P4 at the student's resolution)")
    parser.add_argument("--budget", type=int, help="seconds after which no section starts (default: 330 full, 600 quick)")
    parser.add_argument("--images", type=int, help="images in the training store (default: 48 full, 8 quick)")
    parser.add_argument("--samples-per-shard", dest="samples_per_shard", type=int,
                        help="store shard size (default 4: shards >= loader workers even for 48 images)")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    for name in ("budget", "images", "samples_per_shard"):
        value = getattr(args, name)
        if value is not None:
            sizes = dataclasses.replace(sizes, **{"budget_seconds" if name == "budget" else name: value})
    result = run_check(args, sizes)
    line = json.dumps(result, default=str)
    out = args.out or os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_check.json").write_text(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    main()
