"""The PKD path's own operator count per training step: what ``distillation_loss`` and its backward dispatch, on
the CPU in eager mode, for the paper's pair (projected layout, the recipe's codec, maps kept encoded as CUDA
training keeps them) made small: tiny models, 128 px synthetic images, random student maps of the right shapes.

On a GPU each top-level operator is at least one launch from the host, so the count is the path's fixed cost per
step; it should not grow with the batch.

    python -m benchmarks.pkd_ops            # {"batch_2": ..., "batch_4": ..., "batch_8": ...} and aten calls
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.pairs import PAIRS, extract_config, sized, synthetic_data
from pkd_offline.data import CocoDetection, collate
from pkd_offline.engine import Distillation, batch_padded_hw, distillation_loss
from pkd_offline.levels import pair_levels
from pkd_offline.pyramid import level_size
from pkd_offline.store_data import StoreJoinedDataset, store_views
from stages.extract import extract
from storage import open_store

SMALL_PAIR = sized(PAIRS["paper"], variant="tiny", short_side=128, max_size=128)
SIZE_DIVISOR = 32
IMAGES = 8  # training images of the small store; the largest batch counted
STUDENT_STRIDES = [8, 16, 32, 64]  # RetinaNet's P3..P6, paired by index with the teacher's P2..P5


def small_store(work: Path) -> tuple[Path, Path]:
    """(data directory, store): ``IMAGES`` synthetic images (ragged: 128 or 96 px high) and ``SMALL_PAIR``'s
    projected store of them (the pair's codec)."""
    data = synthetic_data(work / "data", IMAGES, 128, seed=3)
    store = extract(extract_config(SMALL_PAIR, data, work / "paper.zarr", workers=0, batch_size=4,
                                   samples_per_shard=4))
    return data, store


def stored_batch(data: Path, store: Path, size: int) -> list[dict]:
    """The first ``size`` images of ``store`` as training's loader gives them on a GPU (maps kept encoded)."""
    dataset = CocoDetection(data, "train", store_views(store))
    joined = StoreJoinedDataset(dataset, store, keep_encoded=True)
    return collate([joined[(i, 0)] for i in range(size)])


def pkd_step(data: Path, store: Path, size: int, *, seed: int = 0) -> Callable[[], None]:
    """One PKD step (``distillation_loss`` and its backward) on the first ``size`` images of ``store``, with
    random student maps of the pair's shapes (seeded); run once here, so caches (a pca basis, the level layout) are
    warm."""
    batch = stored_batch(data, store, size)
    manifest = open_store(str(store)).manifest
    pairs = pair_levels(STUDENT_STRIDES, [level.stride for level in manifest.levels], SMALL_PAIR.level_map)
    channels = {level.stride: level.channels for level in manifest.levels}
    frame = batch_padded_hw(batch, SIZE_DIVISOR)
    generator = torch.Generator().manual_seed(seed)
    student = {s: torch.randn(size, channels[t], *level_size(frame, s), generator=generator).requires_grad_()
               for s, t in pairs}
    images = [item["image"] for item in batch]
    distill, device = Distillation(pairs, 1.0), torch.device("cpu")

    def step() -> None:
        distillation_loss(student, batch, images, distill, SIZE_DIVISOR, device).backward()
    step()
    return step


def step_events(data: Path, store: Path, size: int):
    """The profiler's events of one PKD step (:func:`pkd_step`) on a batch of ``size``."""
    step = pkd_step(data, store, size)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    return profiler.events()


def operator_counts(events) -> tuple[int, int]:
    """(top-level operators, every aten call) among profiler events: a top-level operator is an ``aten::`` event
    with no ``aten::`` event above it (autograd's node wrappers do not count as operators)."""
    aten = [event for event in events if event.name.startswith("aten::")]
    top = 0
    for event in aten:
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        top += parent is None
    return top, len(aten)


def pkd_op_counts(work: Path | None = None, sizes: tuple[int, ...] = (2, 8)) -> dict[str, int]:
    """{"batch_N": top-level operators} of one PKD step for each batch size in ``sizes`` (at most ``IMAGES``),
    building the small store in ``work`` (a temporary directory when None)."""
    with tempfile.TemporaryDirectory() as scratch:
        data, store = small_store(Path(work or scratch))
        return {f"batch_{size}": operator_counts(step_events(data, store, size))[0] for size in sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2,4,8", help="batch sizes, comma-separated (at most 8)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        data, store = small_store(Path(work))
        report = {}
        for size in (int(s) for s in args.sizes.split(",")):
            top, calls = operator_counts(step_events(data, store, size))
            report[f"batch_{size}"] = {"operators": top, "aten_calls": calls}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
