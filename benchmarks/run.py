"""Benchmarks: the store removes the teacher's cost. Every figure is a ratio measured side by side in one run,
beside its 95% bootstrap interval (``_ci95``, [low, high]).

    python -m benchmarks.run --quick               # the paper's pair (the headline), CPU sizes
    python -m benchmarks.run                       # the paper's pair, more blocks and rounds
    python -m benchmarks.run --device cuda         # the paper's pair at its sizes (1333x800, >= 200 steps a mode)
    python -m benchmarks.run --pair tiny --quick   # the tiny pair: the data path's stress case

``--pair paper`` (``benchmarks.paper_pair``) ends with one JSON line with paper_step_ratio_offline_over_alone (the
worse store format), paper_step_ratio_online_over_alone, paper_offline_over_online,
paper_extract_ratio_over_forward (each with its ``_ci95``), the store's figures (``benchmarks.store_cost``):
index_store_bytes_over_fp32_maps, bytes_ratio_default_codec_over_fp32, decode_rate_over_consumption,
grad_cosine_default, and ``paper_step`` (the step's parts per mode, ``step_breakdown_ms``). ``--pair tiny``
(``benchmarks.tiny_pair``) prints tables, then one JSON line with step_ratio_offline_over_alone,
step_ratio_online_over_alone, offline_over_online, extract_ratio_over_forward (each with its ``_ci95``),
read_rate_over_consumption, bytes_ratio_default_codec_over_fp32 and min_r_default_codec (and the rest).
Both report ``pkd_path_ops_per_step`` {"batch_2": N, "batch_8": N} (``benchmarks.pkd_ops``: the PKD path's
operators per step). With ``--out DIR`` the line is also written to DIR as a result file named by ``benchmarks.results``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from benchmarks.coco_projection import coco_projection
from benchmarks.pairs import PAIRS, sized, synthetic_data
from benchmarks.pkd_ops import pkd_op_counts
from benchmarks.results import ROOT, provenance, write_result
from pkd_offline.extraction.plan import FIT_SAMPLES
from storage import open_store

DEFAULT_CODEC = PAIRS["paper"].codec  # the COCO recipe's (params-coco.yaml: the accuracy study's codec_decision)


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


def step_sizes(args) -> tuple[int, int, int]:
    """(blocks, steps per block, warm-up steps) of the step benchmark: at least 200 timed steps a mode on CUDA,
    fewer on a CPU and with ``--quick``."""
    if args.quick:
        return 3, 2, 1
    return (10, 20, 10) if args.device == "cuda" else (5, 3, 1)


def main_paper(args) -> dict:
    """The paper's pair (``benchmarks.paper_pair``): at its sizes on CUDA, at 320/448 px on a CPU."""
    from benchmarks.paper_pair import bench_paper

    pair = sized(PAIRS["paper"], codec=args.codec or DEFAULT_CODEC)
    if args.device != "cuda":
        pair = sized(pair, short_side=320, max_size=448)
    args.paper_images = 4 if args.quick else 48 if args.device == "cuda" else 8
    args.paper_blocks, args.paper_steps, args.paper_warmup = step_sizes(args)
    args.paper_extract_rounds = 1 if args.quick else 3
    args.paper_extract_images = args.extract_images or ((40, 56) if args.quick else (40, 72))
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, device {args.device}")
    with tempfile.TemporaryDirectory() as tmp:
        return bench_paper(args, pair, Path(tmp))


def main_tiny(args) -> dict:
    """The tiny pair (``benchmarks.tiny_pair``) at ``--image-size`` px: codecs, step, read, extraction, scale."""
    from benchmarks import tiny_pair as tiny
    from benchmarks.step import step_benchmark

    pair = sized(PAIRS["tiny"], variant=args.variant, backbone=args.student_backbone, short_side=args.image_size,
                 max_size=args.image_size, batch_size=args.batch_size)
    blocks, steps_per_block, warmup = step_sizes(args)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = synthetic_data(work / "data", args.images, args.image_size)
        checkpoint = tiny.teacher_checkpoint(args, pair, work)
        print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, device {args.device}, "
              f"{args.images} images at {args.image_size} px, student retinanet/{args.student_backbone} {args.variant}")
        codecs = tiny.bench_codecs(args, pair, data, checkpoint, work)
        print("\ncodec        bytes/image   x of fp32   min r per level")
        for name, row in codecs.items():
            if isinstance(row, dict):
                r = " ".join(f"P{int(s).bit_length() - 1}:{v:.5f}" for s, v in row.get("min_r_per_level", {}).items())
                print(f"{name:<16} {row['bytes_per_image'] / 1e3:>9.1f} kB  {row['ratio_to_fp32']:>8.3f}   {r}")
        stores = {"zarr_int8": work / f"codec-{pair.codec}.zarr",
                  "wds_int8": tiny.extract(tiny.tiny_extract_config(args, pair, data, work / "wds", checkpoint))}
        configs = {mode: tiny.tiny_train_config(args, pair, data, checkpoint, mode, stores)
                   for mode in ("alone", *(f"offline_{name}" for name in stores), "online")}
        step = step_benchmark(configs, stores["zarr_int8"], blocks=blocks, steps_per_block=steps_per_block,
                              warmup=warmup)
        print("\nstep (median ms, data loading included): " + ", ".join(
            f"{mode} {parts['step']:.1f}" for mode, parts in step["step_breakdown_ms"].items()))
        reads = tiny.bench_read(args, pair, data, checkpoint, {**stores, "zarr_fp16": work / "codec-fp16.zarr"},
                                step["step_seconds"]["alone"])
        print(f"store read rate (samples/s, {args.workers} workers): {reads['read_samples_per_s']}; "
              f"student consumes {reads['consumption_samples_per_s']:.1f}")
        extraction = tiny.bench_extraction(args, pair, checkpoint, work)
        print(f"extraction: {extraction}")
        scale = tiny.bench_scale(args, pair, work, checkpoint)
        print(f"scale: {scale}")
        ranks = tiny.bench_ranks(args, pair, work, checkpoint)
        print(f"extraction, 1 vs 2 processes (torchrun): {ranks}")
        synthetic = tiny.bench_synth(work)
        print(f"synthetic data, default set (80 images at 256 px): {synthetic['default_set_seconds']:.2f} s")
        channels = open_store(str(stores["zarr_int8"])).manifest.levels[0].channels
        projection = coco_projection(codecs, {"P2-P5 (index)": [4, 8, 16, 32], "P3-P6 (stride)": [8, 16, 32, 64]},
                                     channels)
        print("COCO train2017 projection (GB): " + ", ".join(f"{k}: {v:.0f}" for k, v in projection.items()))
    return {
        **{key: step[key] for key in ("step_ratio_offline_over_alone", "step_ratio_offline_over_alone_ci95",
                                      "step_ratio_online_over_alone", "step_ratio_online_over_alone_ci95",
                                      "offline_over_online", "offline_over_online_ci95")},
        "extract_ratio_over_forward": extraction["extract_ratio_over_forward"],
        "extract_ratio_over_forward_ci95": extraction["extract_ratio_over_forward_ci95"],
        "read_rate_over_consumption": reads["read_rate_over_consumption"],
        "bytes_ratio_default_codec_over_fp32": codecs[DEFAULT_CODEC]["ratio_to_fp32"],
        "min_r_default_codec": min(codecs[DEFAULT_CODEC]["min_r_per_level"].values()),
        "default_codec": DEFAULT_CODEC, "step": step, "extraction": extraction, "read": reads, "scale": scale,
        "ranks": ranks, "synth": synthetic, "coco_projection_gb": projection,
        "codecs": {k: v for k, v in codecs.items() if isinstance(v, dict)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pair", choices=tuple(PAIRS), default="paper",
                        help="paper: Swin-S -> RetinaNet-R50 at full width (the headline); tiny: the stress case")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", default=PAIRS["tiny"].variant, help="--pair tiny: the models' width")
    parser.add_argument("--student-backbone", default=PAIRS["tiny"].backbone, help="--pair tiny: the student's")
    parser.add_argument("--image-size", type=int, default=PAIRS["tiny"].max_size, help="--pair tiny: px")
    parser.add_argument("--teacher-checkpoint", default=str(ROOT / "runs" / "teacher" / "model.pt"),
                        help="--pair tiny: the demo's teacher (default: a random one where it is absent)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--codec", help=f"--pair paper: the stores' codec (default {DEFAULT_CODEC})")
    parser.add_argument("--batch-size", type=int, default=PAIRS["tiny"].batch_size, help="--pair tiny")
    parser.add_argument("--extract-images", type=extract_image_counts,
                        help="--pair paper: the two extraction runs' image counts, SMALL,LARGE (default 40,72; "
                             "quick 40,56); more images, less noise in the marginal rate")
    parser.add_argument("--out", type=Path, help="also write the JSON line to DIR as a named result file")
    args = parser.parse_args()
    args.images, args.rounds = (16, 3) if args.quick else (64, 5)
    summary = main_paper(args) if args.pair == "paper" else main_tiny(args)
    summary["pkd_path_ops_per_step"] = pkd_op_counts()
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    codec = args.codec or (DEFAULT_CODEC if args.pair == "paper" else PAIRS["tiny"].codec)
    summary["provenance"] = provenance("run", args.pair + ("_quick" if args.quick else ""), device, codec,
                                       f"{device}, {os.cpu_count()} CPUs")
    if args.out:
        print(f"written: {write_result(summary, args.out)}")
    print(json.dumps(summary, default=float))


if __name__ == "__main__":
    main()
