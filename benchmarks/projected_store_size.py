"""Bytes of the projected `index` store against the full-map one, measured, and projected to COCO.

    python -m benchmarks.projected_store_size --data data/synth [--checkpoint runs/teacher/model.pt]
        [--work DIR [--reuse]]

Extracts teacher P2..P5 of ``--data`` (train split, the demo's 192 px and 2 views) with
``--layout full`` and ``--layout projected --student-levels 3,4,5,6`` for each codec, prints
``pkd-offline inspect``'s bytes per sample, then the COCO train2017 sizes (TB, 1 and 2 views, a
256-channel teacher) through ``benchmarks.coco_projection``. Small demo images make
the projection's extra row and column (and per-channel parts) weigh more than at COCO size, so the
COCO figures take each level's measured bytes per stored map value times the values the level
holds for the typical COCO image (1067x800 px, padded to multiples of 32), plus its measured
per-channel parts (int8 scale and offset, the projection's float64 sums), not bytes per pixel.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

from benchmarks.coco_projection import COCO_PIXELS, coco_projection
from benchmarks.pairs import PAIRS, extract_config, sized
from pkd_offline.pyramid import level_size
from stages.extract import extract
from storage import describe, open_store

ROOT = Path(__file__).resolve().parents[1]

TEACHER_STRIDES = [4, 8, 16, 32]
CODECS = ("fp32", "fp16", "int8", "pca")
COCO_HW = (800, 1067)


def coco_values(stride: int, projected: bool) -> int:
    """Values per channel that one level holds for the typical COCO image (the store's own sizes)."""
    padded = tuple(math.ceil(v / 32) * 32 for v in COCO_HW)
    if not projected:
        return math.prod(level_size(padded, stride))
    valid = level_size(COCO_HW, stride)
    return math.prod(math.ceil(v / 2) + 1 for v in valid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data/synth")
    parser.add_argument("--checkpoint", type=Path, help="teacher weights (default: random init, seeded)")
    parser.add_argument("--work", type=Path, help="where the stores go (default: a temporary directory)")
    parser.add_argument("--reuse", action="store_true", help="read stores already in --work instead of extracting")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="projected-size-"))
    # The tiny pair's teacher and views with the index pairing's levels: P2..P5 for student P3..P6.
    pair = sized(PAIRS["tiny"], teacher_levels="2,3,4,5", student_levels="3,4,5,6")
    results = {}
    for codec in CODECS:
        for layout in ("full", "projected"):
            cfg = extract_config(pair, args.data, work / f"{layout}-{codec}.zarr", checkpoint=args.checkpoint,
                                 codec=codec, layout=layout, batch_size=8, workers=2)
            reuse = args.reuse and (cfg.out / "manifest.json").exists()
            store = open_store(str(cfg.out if reuse else extract(cfg)))
            summary = describe(store)
            channels = store.manifest.levels[0].channels
            values = {s: 0 for s in TEACHER_STRIDES}
            for sample in store.iter_samples():
                for s in TEACHER_STRIDES:
                    values[s] += sample.features[s].size
            projected = store.manifest.projected_strides
            n = len(store)
            per_value, per_channel = {}, {}
            for s in TEACHER_STRIDES:
                kinds = store.manifest.level_parts(s)
                map_bytes = sum(store.location.tree_bytes(f"s{s}/{p}") for p, (_, k) in kinds.items() if k == "map")
                channel_bytes = sum(store.location.tree_bytes(f"s{s}/{p}") for p, (_, k) in kinds.items() if k != "map")
                per_value[s], per_channel[s] = map_bytes / values[s], channel_bytes / (n * channels)
            results[(codec, layout)] = {
                "bytes_per_sample": summary["bytes_per_image"],
                "levels": {s: summary["levels"][s]["bytes_per_image"] for s in TEACHER_STRIDES},
                # coco_projection multiplies by COCO_PIXELS and 256 / channels: hand it bytes per pixel.
                "bytes_per_pixel_per_level": {
                    s: (per_value[s] * coco_values(s, s in projected) + per_channel[s]) * channels / COCO_PIXELS
                    for s in TEACHER_STRIDES},
            }
            levels = ", ".join(f"P{s.bit_length() - 1} {b / 1e3:.1f}" for s, b in results[(codec, layout)]["levels"].items())
            print(f"{layout:9s} {codec}: {summary['bytes_per_image'] / 1e3:7.1f} kB per sample ({levels})")
    for codec in CODECS:
        ratio = results[(codec, "projected")]["bytes_per_sample"] / results[(codec, "full")]["bytes_per_sample"]
        print(f"{codec}: projected / full bytes per sample on this data: {ratio:.3f}")
    table = {}
    for layout in ("full", "projected"):
        codecs = {codec: results[(codec, layout)] for codec in CODECS}
        table[layout] = coco_projection(codecs, {"P2-P5": TEACHER_STRIDES}, channels)
    print("COCO train2017, 256 channels, TB (1 view / 2 views):")
    for codec in CODECS:
        cells = [" / ".join(f"{table[layout][f'{codec} P2-P5 views={v}'] / 1e3:.2f}" for v in (1, 2))
                 for layout in ("full", "projected")]
        print(f"  {codec}: full {cells[0]}   projected {cells[1]}")
    print(json.dumps({layout: {k: round(v / 1e3, 3) for k, v in t.items()} for layout, t in table.items()}))


if __name__ == "__main__":
    main()
