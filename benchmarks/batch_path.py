"""Extraction's per-batch path, piece by piece (the GPU check's ``batch`` section), and on CUDA where its launching
part waits for the device.

Pieces, each waited for on the device (ms per batch, medians over the batches of two rounds after a warm-up one):
the images' copy to the device, the teacher forward alone, ``teacher_levels`` whole (copy, forward, projections
and checks), and ``launch_encode`` + ``finish`` (encoding and the copy to the host); on CUDA the forward and
``teacher_levels`` again through a graph per batch shape, as extraction runs them. The waits come from torch's
sync debug mode: the project's source lines that waited (none: the host can run a batch ahead of the device).
"""

from __future__ import annotations

import statistics
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from pkd_offline.device_codecs import device_basis
from pkd_offline.extraction.encode import finish, launch_encode
from pkd_offline.extraction.teacher_maps import teacher_levels
from pkd_offline.graphed_forward import graphed_backbone
from pkd_offline.precision import forward_autocast
from storage import open_store
from storage.codecs import needs_basis
from storage.pca_basis import read_side
from storage.store import existing_side

ROOT = Path(__file__).resolve().parents[1]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def store_bases(store: Path, device: torch.device) -> dict:
    """{stride: the store's pca basis on ``device``} ({} for a codec without one)."""
    manifest = open_store(str(store)).manifest
    if not needs_basis(manifest.codec):
        return {}
    side = read_side(existing_side(str(store)), {level.stride: level.channels for level in manifest.levels}, str(store))
    return {stride: device_basis(basis, device) for stride, basis in side.items()}


def launch_waits(teacher, batches: list[list[dict]], strides: list[int], device: torch.device,
                 projected: frozenset[int], codec: str, bases: dict, n_views: int) -> dict[str, int]:
    """{"source:line (message)": count} of the device waits the launching part (``teacher_levels``,
    ``launch_encode``) makes on two batches, from torch's sync debug mode (CUDA only)."""
    waits: Counter = Counter()

    def note(message, category, filename, lineno, file=None, line=None):
        if str(message).startswith("Synchronization debug mode is a prototype"):
            return  # torch's notice on switching the mode on, not a wait
        ours = [frame for frame in traceback.extract_stack()[:-1] if str(ROOT) in frame.filename
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
                                         strides, codec, bases)
                torch.cuda.set_sync_debug_mode(0)
                finish(launched, n_views)
                torch.cuda.set_sync_debug_mode("warn")
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return dict(waits)


def batch_path(teacher, batches: list[list[dict]], store: Path, device: torch.device) -> dict:
    """The per-batch figures (module docstring) of ``teacher`` on ``batches`` (dataset items on the host, one
    padded size per batch), encoded as the store at ``store`` encodes."""
    manifest = open_store(str(store)).manifest
    strides = list(manifest.strides)
    projected = frozenset(t for s, t in manifest.layout.get("pairs", []) if t in manifest.layout.get("projected", []))
    bases = store_bases(store, device)
    if device.type == "cuda":
        for item in (item for batch in batches for item in batch):
            item["image"] = item["image"].pin_memory()
    times: dict[str, list[float]] = {"copy": [], "forward": [], "teacher_levels": [], "encode_and_finish": []}
    backbones = {"": None}  # timing-name suffix -> the teacher's backbone stand-in (None: its own)
    if device.type == "cuda":
        backbones["_graphed"] = graphed_backbone(teacher, device)
        times.update(forward_graphed=[], teacher_levels_graphed=[])
    graph_differences = []  # max |graphed - eager| over a batch's stored levels

    def timed(name: str | None, work: Callable):
        synchronize(device)
        tick = time.perf_counter()
        value = work()
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
                with torch.inference_mode(), forward_autocast(device):
                    timed(keep("forward" + suffix), lambda: teacher.features(images, backbone))
                levels[suffix] = timed(keep("teacher_levels" + suffix),
                                       lambda: teacher_levels(teacher, batch, strides, device, projected, backbone))
            maps = levels[""]
            if "_graphed" in levels:
                graph_differences.append(max(float((a - b).abs().max()) for s in strides for (_, a), (_, b)
                                             in zip(maps.levels[s], levels["_graphed"].levels[s])))
            timed(keep("encode_and_finish"), lambda: finish(launch_encode(batch, maps, strides, manifest.codec, bases),
                                                            manifest.n_views))
    cuda = device.type == "cuda"
    return {"images_per_batch": [len(b) for b in batches], "codec": manifest.codec, "projected": sorted(projected),
            "ms_per_batch": {name: statistics.median(values) for name, values in times.items()},
            "launch_waits_for_device": launch_waits(teacher, batches, strides, device, projected, manifest.codec,
                                                    bases, manifest.n_views) if cuda else None,
            "graphed_max_abs_difference": max(graph_differences) if graph_differences else None,
            "graphs_captured": backbones["_graphed"].captures if cuda else None}
