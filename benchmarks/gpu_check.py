"""The GPU check: the CUDA path end to end, timed, in one run that ends with one JSON line.

    bash benchmarks/gpu_check.sh                            # on a GPU node (installs from .whl/ first)
    python -m benchmarks.gpu_check --device cpu --quick     # the same sections, small, on a CPU

The pair is the paper's (``benchmarks.pairs.PAIRS["paper"]``: Swin-S teacher P2..P5, projected layout, the
COCO recipe's codec; RetinaNet-R50 student at 1333x800 px, batch 2, bf16 on CUDA); ``--codec`` and ``--layout`` change the
store, ``--quick`` the sizes. Sections (each fails soft: its error goes to ``errors[section]`` and the next one
runs): synth (the project's generator, COCO-size images), extract (the CLI into zarr and WebDataset; its numbers
from the run's record, ``--record``), forward (the teacher alone on preloaded inputs), verify (the CLI, on the
device), steps (``benchmarks.step``: the student alone, offline from each store, online with the teacher,
interleaved in blocks, each step split into its parts; ratios with 95% bootstrap intervals over blocks), read
(store read rate vs the student's consumption), loss (offline loss == online loss on a batch of equal-size
images), torchrun (extract and train under ``torchrun --nproc_per_node 1``: nccl on CUDA, gloo on CPU), batch
(``benchmarks.batch_path``: extraction's per-batch path piece by piece), cuda_tests, extract_long (stage one over
at least ``long_samples`` samples, with and without CUDA graphs; last, in what the budget leaves). See docs/gpu.md
for every key.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
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

from benchmarks.batch_path import batch_path, synchronize
from benchmarks.pairs import PAIRS, Pair, extract_command, extract_config, params_file, sized, train_config
from benchmarks.results import provenance, result_name
from benchmarks.step import loader_rate, step_benchmark
from pkd_offline.data import IMAGE_DECODES, CocoDetection
from pkd_offline.distributed import Ranks, half_the_cpus
from pkd_offline.engine import distillation_loss
from pkd_offline.extraction.writers import default_writer_threads
from pkd_offline.models import build_detector
from pkd_offline.precision import forward_autocast
from pkd_offline.store_data import StoreJoinedDataset, store_views
from pkd_offline.teachers import load_teacher
from stages.train import setup_distillation
from storage import CODECS, describe, open_store

ROOT = Path(__file__).resolve().parents[1]
PAPER = PAIRS["paper"]

# Offline and online PKD losses on the same batch may differ by the teacher's bf16 rounding (batch
# composition changes kernels) and the store's codec (fp16: 2^-11 relative; int8: 1/255 of a
# channel's range; pca: its step); both are far below this relative tolerance. A codec of fewer than
# 6 bits a value (int4, int2) moves the loss by its own rounding, so its check is ten times wider.
LOSS_REL_TOLERANCE = 1e-3
COARSE_CODEC_LOSS_REL_TOLERANCE = 1e-2


def loss_tolerance(codec: str) -> float:
    """The offline-vs-online relative loss tolerance for a store in ``codec``."""
    bits = CODECS[codec].bits
    return COARSE_CODEC_LOSS_REL_TOLERANCE if bits is not None and bits < 6 else LOSS_REL_TOLERANCE


@dataclass
class Sizes:
    """How big the check runs: ``images`` in the training store (half of them for the torchrun check),
    synthetic images of ``image_size`` px long side, views resized to ``short_side``/``max_size`` px; the step
    benchmark's ``warmup`` untimed steps per mode, then ``blocks`` interleaved blocks of ``steps_per_block``."""

    images: int
    image_size: int
    short_side: int
    max_size: int
    variant: str
    batch_size: int
    extract_batch_size: int
    warmup: int
    blocks: int
    steps_per_block: int
    forward_rounds: int
    verify_samples: int
    torchrun_iters: int
    backbone: str
    budget_seconds: int  # sections not started by then are skipped, so the JSON line always comes
    samples_per_shard: int  # store shards >= loader workers, so every worker streams and writes overlap forwards
    long_samples: int  # the long extraction's samples at least: the training set repeated as often as needed


FULL = Sizes(images=48, image_size=1333, short_side=PAPER.short_side, max_size=PAPER.max_size, variant=PAPER.variant,
             batch_size=PAPER.batch_size, extract_batch_size=8, warmup=10, blocks=10, steps_per_block=20,
             forward_rounds=3, verify_samples=3, torchrun_iters=3, backbone=PAPER.backbone, budget_seconds=420,
             samples_per_shard=4, long_samples=2000)
QUICK = Sizes(images=8, image_size=160, short_side=128, max_size=160, variant="tiny", batch_size=2,
              extract_batch_size=4, warmup=1, blocks=3, steps_per_block=2, forward_rounds=2, verify_samples=2,
              torchrun_iters=2, backbone="resnet18", budget_seconds=600, samples_per_shard=4, long_samples=24)
MODES = ("alone", "offline_zarr", "offline_wds", "online")
START = time.perf_counter()
DEADLINE = [START + 600.0]  # subprocesses are killed past it (set from the budget in main)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - START:6.1f}s] {message}", flush=True)


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


def check_pair(args, sizes: Sizes) -> Pair:
    """The paper pair at the check's sizes, with ``--codec`` and ``--layout`` where given."""
    return sized(PAPER, variant=sizes.variant, backbone=sizes.backbone, short_side=sizes.short_side,
                 max_size=sizes.max_size, batch_size=sizes.batch_size, codec=args.codec or PAPER.codec,
                 layout=args.layout or PAPER.layout)


def run_extract(args, sizes: Sizes, work: Path, data: str, out: str, name: str, *, torchrun: bool = False,
                **settings) -> tuple[float, dict]:
    """``pkd-offline extract`` of the check's pair on ``work/data`` into ``work/out`` as a subprocess (under
    torchrun if asked): (whole-command seconds, the run's record)."""
    cfg = extract_config(check_pair(args, sizes), work / data, work / out, batch_size=sizes.extract_batch_size,
                         workers=args.workers, samples_per_shard=sizes.samples_per_shard, device=args.device,
                         **settings)
    command, record = extract_command(cfg, work, name)
    seconds = cli(command, torchrun=torchrun)[0]
    return seconds, json.loads(record.read_text())


def section_synth(args, sizes: Sizes, work: Path, result: dict) -> None:
    for name, count in (("data", sizes.images), ("half", sizes.images // 2)):
        cli(["data", "synth", "--out", str(work / name), "--train", str(count), "--val", "2", "--image-size",
             str(sizes.image_size), "--seed", "0"])
    dataset = CocoDetection(work / "data", "train", [])
    result["synth"] = {"images": sizes.images, "original_hw": dict(Counter(
        "x".join(map(str, dataset.original_hw(i))) for i in dataset.image_ids))}


def steady(record: dict) -> tuple[int, float]:
    """(samples, seconds) of a run's record past the pca fit: what every run pays once is left out."""
    return record["samples"] - record["fit_samples"], record["seconds"] - record["fit_seconds"]


def steady_rate(record: dict) -> float:
    """Samples/s of a run's record past the pca fit; over the whole run where every sample fell within the fit
    (a store smaller than the fit's samples)."""
    rate = record["steady_samples_per_second"]
    return rate if rate is not None else record["samples_per_second"]


def section_extract(args, sizes: Sizes, work: Path, result: dict) -> None:
    """Whole-command seconds and, from each run's record, the steady rate of ``extract`` into zarr and into
    WebDataset (``steady_rate``: samples per second past the pca fit, to the last shard written: start-up is left
    out, encoding and writing are in), seconds per phase and CUDA graph captures. Also zarr on the half set (the marginal rate) and,
    on CUDA, both zarr runs with ``cuda_graphs`` off (``zarr_eager``: the teacher launched kernel by kernel)."""
    images = {"data": sizes.images, "half": sizes.images // 2}  # section_synth's two sets
    runs = [("zarr", "data", "f.zarr", {}), ("wds", "data", "wds", {"store_format": "wds"}),
            ("zarr_half", "half", "half_f.zarr", {})]
    if args.device == "cuda":
        runs += [("zarr_eager", "data", "eager.zarr", {"cuda_graphs": False}),
                 ("zarr_eager_half", "half", "half_eager.zarr", {"cuda_graphs": False})]
    seconds, records = {}, {}
    for name, data, out, settings in runs:
        seconds[name], records[name] = run_extract(args, sizes, work, data, out, name, **settings)
        rate = steady_rate(records[name])
        log(f"  extract {name} {images[data]} images: {seconds[name]:.1f} s, steady {rate:.1f} img/s, "
            f"{records[name]['cuda_graph_captures']} cuda graphs")
    rates = {name: steady_rate(record) for name, record in records.items()}
    summaries = {name: describe(open_store(str(work / name)), digest=False) for name in ("f.zarr", "wds")}
    # The marginal rate: the samples of the whole set beyond the half set over the steady seconds they added,
    # so what every run pays once (kernel selection, the last shards) drops out, as on a COCO-size run.
    marginal = {}
    for name, half in (("zarr", "zarr_half"), ("zarr_eager", "zarr_eager_half")):
        if name in records and steady(records[name])[1] > steady(records[half])[1]:
            (whole, whole_seconds), (part, part_seconds) = steady(records[name]), steady(records[half])
            marginal[name] = (whole - part) / (whole_seconds - part_seconds)
    result["extract"] = {"seconds": seconds, "img_per_s_steady": {"zarr": rates["zarr"], "wds": rates["wds"]},
                         "img_per_s_steady_all": rates, "img_per_s_marginal": marginal,
                         "img_per_s_steady_without_graphs": rates.get("zarr_eager"),
                         "cuda_graphs": {name: {key: record[key] for key in ("cuda_graph_captures",
                                                                             "cuda_graph_capture_seconds")}
                                         for name, record in records.items()},
                         "phase_seconds": {name: record["phase_seconds"] for name, record in records.items()},
                         "records": records,
                         "img_per_s_whole_command": {name: images[data] / seconds[name] for name, data, _, _ in runs},
                         "writer_threads": default_writer_threads(), "codec": summaries["f.zarr"]["codec"],
                         "store_bytes_per_image": {"zarr": summaries["f.zarr"]["bytes_per_image"],
                                                   "wds": summaries["wds"]["bytes_per_image"]}}


def teacher_and_batches(args, sizes: Sizes, work: Path, device: torch.device) -> tuple[torch.nn.Module, list[list[dict]]]:
    """The check's teacher on ``device`` and the training images' first views (dataset items, on the host) in
    batches as extract makes them: one padded size each, at most ``extract_batch_size``."""
    pair = check_pair(args, sizes)
    dataset = CocoDetection(work / "data", "train", store_views(work / "f.zarr"))
    teacher, _ = load_teacher(pair.teacher, checkpoint=None, random_init=True, variant=pair.variant,
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
    teacher, item_batches = teacher_and_batches(args, sizes, work, device)
    batches = [[item["image"].to(device) for item in items] for items in item_batches]
    strides = [2 ** int(level) for level in PAPER.teacher_levels.split(",")]
    modes = {"forward": None}
    if device.type == "cuda":
        modes["forward_graphed"] = graphed_backbone(teacher, device)
    for mode, backbone in modes.items():
        rates = []
        for round_index in range(sizes.forward_rounds + 1):
            synchronize(device)
            tick = time.perf_counter()
            with torch.inference_mode(), forward_autocast(device):
                for batch in batches:
                    features, _ = teacher.features(batch, backbone)
                    for s in strides:
                        features[s].float()
            synchronize(device)
            if round_index > 0:  # round 0 warms up kernels and the allocator (and captures the graphs)
                rates.append(sum(map(len, batches)) / (time.perf_counter() - tick))
        result[mode] = {"img_per_s": statistics.median(rates), "rounds": rates}
        log(f"  {mode}: {result[mode]['img_per_s']:.1f} img/s")
    steady_rates = result.get("extract", {}).get("img_per_s_steady", {})
    if steady_rates and all(steady_rates.values()):
        per_format = {name: rate / result["forward"]["img_per_s"] for name, rate in steady_rates.items()}
        result["extract_ratio_over_forward_per_format"] = per_format
        result["extract_ratio_over_forward"] = min(per_format.values())
        if "forward_graphed" in result:
            result["extract_ratio_over_graphed_forward"] = (min(steady_rates.values())
                                                            / result["forward_graphed"]["img_per_s"])
        eager = result["extract"].get("img_per_s_steady_without_graphs")
        if eager:
            result["extract_ratio_without_graphs_over_forward"] = eager / result["forward"]["img_per_s"]
        result["extract_marginal_ratio_over_forward"] = {
            name: rate / result["forward"]["img_per_s"] for name, rate in result["extract"]["img_per_s_marginal"].items()}


def repeated_set(work: Path, copies: int) -> Path:
    """``work/long``: the training set (``work/data``) listed ``copies`` times under new image ids, its images the
    same files (``long/train`` links to ``data/train``): a long run of the one synthetic set, at its sizes."""
    source = json.loads((work / "data" / "annotations" / "instances_train.json").read_text())
    images, annotations = [], []
    top_image = max(image["id"] for image in source["images"])
    top_annotation = max((a["id"] for a in source["annotations"]), default=0)
    for copy in range(copies):
        images += [{**image, "id": image["id"] + copy * top_image} for image in source["images"]]
        annotations += [{**a, "id": a["id"] + copy * top_annotation, "image_id": a["image_id"] + copy * top_image}
                        for a in source["annotations"]]
    long = work / "long"
    (long / "annotations").mkdir(parents=True, exist_ok=True)
    (long / "annotations" / "instances_train.json").write_text(json.dumps({**source, "images": images,
                                                                           "annotations": annotations}))
    if not (long / "train").exists():
        (long / "train").symlink_to((work / "data" / "train").resolve(), target_is_directory=True)
    return long


def section_extract_long(args, sizes: Sizes, work: Path, result: dict) -> None:
    """Stage one over a long run: the training set repeated (``repeated_set``) to at least ``long_samples`` samples
    of its own sizes (so start-up is a small share and the forward's rate applies), into zarr, and on CUDA again
    with ``cuda_graphs`` off. Per run, from its record: the steady rate, the share of its seconds spent before the
    steady state (the pca fit and the graph captures, ``warmup_share``), seconds per phase and captures; over the
    teacher forward's rate (section ``forward``, run before it) where there is one:
    ``extract_long_ratio_over_forward`` (the graphed run; the eager one beside)."""
    copies = -(-sizes.long_samples // (sizes.images * PAPER.views))
    repeated_set(work, copies)
    runs = [("long", {})] + ([("long_eager", {"cuda_graphs": False})] if args.device == "cuda" else [])
    figures = {}
    for name, settings in runs:
        seconds, record = run_extract(args, sizes, work, "long", f"{name}.zarr", name, **settings)
        warmup = record["fit_seconds"] + record["cuda_graph_capture_seconds"]
        figures[name] = {"samples": record["samples"], "copies_of_the_set": copies, "command_seconds": seconds,
                         "record_seconds": record["seconds"], "img_per_s_steady": steady_rate(record),
                         "warmup_share": warmup / record["seconds"] if record["seconds"] else None,
                         "phase_seconds": record["phase_seconds"],
                         "cuda_graph_captures": record["cuda_graph_captures"],
                         "cuda_graph_capture_seconds": record["cuda_graph_capture_seconds"]}
        log(f"  extract {name}: {record['samples']} samples in {record['seconds']:.1f} s, steady "
            f"{figures[name]['img_per_s_steady']:.1f} img/s, warm-up {figures[name]['warmup_share']:.1%}, "
            f"{record['cuda_graph_captures']} cuda graphs")
        shutil.rmtree(work / f"{name}.zarr", ignore_errors=True)  # a long store is large; nothing reads it again
    result["extract_long"] = figures
    forward = result.get("forward", {}).get("img_per_s")
    if forward:
        result["extract_long_ratio_over_forward"] = figures["long"]["img_per_s_steady"] / forward
        if "long_eager" in figures:
            result["extract_long_eager_ratio_over_forward"] = figures["long_eager"]["img_per_s_steady"] / forward


def section_verify(args, sizes: Sizes, work: Path, result: dict) -> None:
    seconds, stdout, _ = cli(["verify", str(work / "f.zarr"), "--data", str(work / "data"), "--samples",
                              str(sizes.verify_samples), "--device", args.device, "--json", "--no-progress"])
    report = json.loads(stdout)
    result["verify"] = {"ok": report["ok"], "seconds": seconds, "threshold": report["threshold"],
                        "levels": report["levels"], "shard_problems": report["shard_problems"]}
    if not report["ok"]:
        raise RuntimeError(f"verify FAILED: {report['text'].splitlines()[-1]}")


def mode_config(args, sizes: Sizes, work: Path, mode: str, **settings):
    """The TrainConfig of ``mode`` (``MODES``) for the check's pair on the training set."""
    stores = {"offline_zarr": work / "f.zarr", "offline_wds": work / "wds"}
    return train_config(check_pair(args, sizes), work / "data", features=stores.get(mode), online=mode == "online",
                        **{"workers": args.workers, "device": args.device, "lr": 0.002,
                           "image_decode": args.image_decode, **settings})


def section_steps(args, sizes: Sizes, work: Path, result: dict) -> None:
    """``benchmarks.step``: every mode resident, interleaved in blocks; per mode the median step and its parts
    (``step_breakdown_ms``) and the peak device memory its build and warm-up added; the ratios with their
    95% intervals over blocks."""
    configs = {mode: mode_config(args, sizes, work, mode) for mode in MODES}
    result.update(step_benchmark(configs, work / "f.zarr", blocks=sizes.blocks, steps_per_block=sizes.steps_per_block,
                                 warmup=sizes.warmup))
    log("  steps (median ms): " + ", ".join(f"{mode} {parts['step']:.1f}"
                                            for mode, parts in result["step_breakdown_ms"].items()))


def section_read(args, sizes: Sizes, work: Path, result: dict) -> None:
    """Samples/s the training loader (same workers, batch size and pinning) delivers from each store, images
    decoded and teacher maps as training gets them (decoded in the workers on a CPU, as stored on CUDA, where
    the device decodes them in the step); clocked from the first batch over two more epochs, so worker
    start-up is not the rate. The student consumes batch_size / (step alone) samples/s."""
    rates = {name: loader_rate(mode_config(args, sizes, work, mode), work / "f.zarr", 2 * sizes.images * PAPER.views)
             for name, mode in (("images_only", "alone"), ("zarr", "offline_zarr"), ("wds", "offline_wds"))}
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
        cfg = mode_config(args, sizes, work, mode)
        dataset = CocoDetection(cfg.data, cfg.split, store_views(work / "f.zarr"))
        if student_features is None:
            sizes_seen = Counter(dataset.original_hw(i) for i in dataset.image_ids)
            common = sizes_seen.most_common(1)[0][0]
            chosen = [i for i, image_id in enumerate(dataset.image_ids) if dataset.original_hw(image_id) == common]
            chosen = chosen[: max(2, sizes.batch_size)]
            torch.manual_seed(0)
            model = build_detector(cfg.student, num_classes=dataset.num_classes, variant=cfg.variant,
                                   backbone=cfg.backbone).to(device)
            model.train()
            batch = [dataset[(i, 0)] for i in chosen]
            images = [item["image"].to(device) for item in batch]
            targets = [{k: v.to(device) for k, v in item["target"].items()} for item in batch]
            with torch.no_grad(), forward_autocast(device):
                _, student_features = model(images, targets)
        source, distill = setup_distillation(cfg, dataset, model, device, Ranks())
        joined = StoreJoinedDataset(dataset, cfg.features, keep_encoded=device.type == "cuda")  # as training reads
        items = batch if mode == "online" else [joined[(i, 0)] for i in chosen]
        with torch.no_grad(), forward_autocast(device):
            figures[mode] = float(distillation_loss(student_features, items, images, distill, 32, device))
    diffs = {m.removeprefix("offline_"): abs(figures[m] - figures["online"]) / abs(figures["online"])
             for m in ("offline_zarr", "offline_wds")}
    result["loss_check"] = {"images": len(chosen), "image_hw": list(batch[0]["image_hw"]), "loss": figures,
                            "rel_diff": diffs, "tolerance": loss_tolerance(args.codec or PAPER.codec)}
    result["offline_online_loss_rel_diff"] = max(diffs.values())
    if result["offline_online_loss_rel_diff"] > result["loss_check"]["tolerance"]:
        raise RuntimeError(f"offline vs online PKD loss differ by {result['offline_online_loss_rel_diff']:.3g} "
                           f"(tolerance {result['loss_check']['tolerance']})")


def section_torchrun(args, sizes: Sizes, work: Path, result: dict) -> None:
    """``torchrun --nproc_per_node 1``: extract (half the images) and a few offline training steps."""
    run_extract(args, sizes, work, "half", "half.zarr", "half")
    seconds = {"extract": run_extract(args, sizes, work, "half", "torchrun.zarr", "torchrun", torchrun=True)[0]}
    digests = [describe(open_store(str(work / name)))["digest"] for name in ("half.zarr", "torchrun.zarr")]
    run = work / "torchrun_run"
    cfg = mode_config(args, sizes, work, "offline_zarr", out=run, iters=sizes.torchrun_iters, workers=2)
    seconds["train"] = cli(["train", "--params", str(params_file(cfg, "train", work / "torchrun.train.yaml"))],
                           torchrun=True)[0]
    log_lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    if [r["iter"] for r in log_lines] != list(range(1, sizes.torchrun_iters + 1)):
        raise RuntimeError(f"torchrun train logged iterations {[r['iter'] for r in log_lines]}")
    result["torchrun"] = {"backend": "nccl" if args.device.startswith("cuda") else "gloo", "seconds": seconds,
                          "store_digest_equal_to_single_process": digests[0] == digests[1] and digests[0] is not None,
                          "train_losses": [r["loss"] for r in log_lines]}


def section_batch(args, sizes: Sizes, work: Path, result: dict) -> None:
    """``benchmarks.batch_path`` on the check's teacher and the training images, encoded as ``f.zarr`` is."""
    device = torch.device(args.device)
    teacher, batches = teacher_and_batches(args, sizes, work, device)
    result["batch_path"] = batch_path(teacher, batches, work / "f.zarr", device)


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


# extract_long comes last: the checks before it are short, and it takes what the budget leaves (alone:
# --only synth,extract,forward,extract_long).
SECTIONS = {"synth": section_synth, "extract": section_extract, "forward": section_forward, "verify": section_verify,
            "steps": section_steps, "read": section_read, "loss": section_loss, "torchrun": section_torchrun,
            "batch": section_batch, "cuda_tests": section_cuda_tests, "extract_long": section_extract_long}


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
    tensors over in shared memory: a COCO-size sample's P2..P5 maps are 256 x 72,250 float32 values, about 74 MB)."""
    workers = half_the_cpus()
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
    pair = check_pair(args, sizes)
    result: dict = {**environment(args), "quick": args.quick, "sizes": vars(sizes), "workers": args.workers,
                    "shm_free_gb": shm_gb, "teacher": pair.teacher, "student": f"{pair.student}/{pair.backbone}",
                    "levels": pair.teacher_levels, "level_map": pair.level_map, "codec_flag": args.codec,
                    "codec": pair.codec, "layout": pair.layout, "image_decode": args.image_decode, "errors": {},
                    "section_seconds": {}}
    result["provenance"] = provenance("gpu_check", "paper_quick" if args.quick else "paper", result["device"],
                                      pair.codec, f"{result['device']}, {result['cpus']} CPUs")
    if os.environ.get("PKD_INSTALL_SECONDS"):
        result["install_seconds"] = float(os.environ["PKD_INSTALL_SECONDS"])
    for key in ("extract_ratio_over_forward", "extract_long_ratio_over_forward", "step_ratio_offline_over_alone",
                "step_ratio_online_over_alone", "offline_over_online", "read_rate_over_consumption",
                "offline_online_loss_rel_diff"):
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
    parser.add_argument("--out", help="folder for gpu_check.json and the same line as a named result file "
                        "(benchmarks.results; default: $OUT if set)")
    parser.add_argument("--work", help="scratch folder (default: a temporary one, removed at the end)")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: half the CPUs, at most 8)")
    parser.add_argument("--only", help="comma-separated sections to run, in order (default: all)")
    parser.add_argument("--image-decode", dest="image_decode", default="workers", choices=IMAGE_DECODES,
                        help="where every training mode (the student alone too) decodes its JPEGs: the loader's "
                             "workers, or the step on the device (nvJPEG on CUDA)")
    parser.add_argument("--codec", choices=sorted(CODECS), help=f"store codec (default: the pair's, {PAPER.codec})")
    parser.add_argument("--layout", choices=("full", "projected"),
                        help=f"store layout (default: the pair's, {PAPER.layout}: P2..P4 at the student's resolution)")
    parser.add_argument("--budget", type=int, help=f"seconds after which no section starts (default: "
                        f"{FULL.budget_seconds} full, {QUICK.budget_seconds} quick)")
    parser.add_argument("--images", type=int, help=f"images in the training store (default: {FULL.images} full, "
                        f"{QUICK.images} quick)")
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
        (Path(out) / result_name(result["provenance"])).write_text(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    main()
