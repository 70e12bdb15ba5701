"""Reading a zarr store three ways, side by side: the hand-written direct shard reads against zarr-python's codec
pipeline, its default and ``zarrs`` (the Rust codec pipeline, ``pip install zarrs``).

    python -m benchmarks.zarr_pipeline                          # the paper pair's store at 1333x800 px, 8 images
    python -m benchmarks.zarr_pipeline --store STORE.zarr       # an existing zarr store
    python -m benchmarks.zarr_pipeline --out benchmarks/results

Each path is a ``ZarrReader`` of the same store: ``direct`` reads a sample's chunks straight from the shard files
(``storage.zarr_direct``), ``zarr`` and ``zarrs`` read them through ``zarr``'s async ``getitem`` with the pipeline
the array was opened under (``zarr.config`` ``codec_pipeline.path``). A round reads every sample once through each
path, in a rotated order, maps kept encoded as CUDA training keeps them (what a loader worker does per sample);
the first round is warm-up. Ratios are of medians over rounds, with 95% bootstrap intervals over rounds
(``benchmarks.timing``). Without ``zarrs`` installed its path is reported missing. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from benchmarks.pairs import PAIRS, extract_config, sized, synthetic_data
from benchmarks.results import provenance, result_name
from benchmarks.timing import bootstrap_ratio_ci, ratio_of_medians
from stages.extract import extract
from storage import open_store
from storage.files import Location
from storage.base import read_manifest
from storage.zarr_store import ZarrReader

ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"


@contextlib.contextmanager
def codec_pipeline(path: str | None):
    """zarr's codec pipeline set to ``path`` (a dotted class name) while arrays are opened; unchanged for None."""
    if path is None:
        yield
        return
    with zarr.config.set({"codec_pipeline.path": path}):
        yield


def readers(store: Path) -> dict[str, ZarrReader]:
    """{path name: a reader of ``store``}: ``direct``, ``zarr`` and, where ``zarrs`` imports, ``zarrs``."""
    location = Location(str(store))
    manifest = read_manifest(location)
    paths = {"direct": (True, None), "zarr": (False, None)}
    try:
        import zarrs  # noqa: F401  (the pipeline is found by name)
        paths["zarrs"] = (False, ZARRS_PIPELINE)
    except ImportError:
        pass
    opened = {}
    for name, (direct, pipeline) in paths.items():
        with codec_pipeline(pipeline):
            opened[name] = ZarrReader(location, manifest, direct_reads=direct)
            opened[name].keep_encoded = True  # the bytes read and unpacked, not the codec's own decode
    if not opened["direct"]._direct:
        raise SystemExit(f"{store}: not a layout the direct reads serve (a local store ZarrWriter wrote)")
    return opened


def read_all(reader: ZarrReader, order: list[int]) -> float:
    """Seconds to read the samples in ``order`` (each one's every array part, decoded from the stored bytes)."""
    tick = time.perf_counter()
    for index in order:
        reader.read(index)
    return time.perf_counter() - tick


def same_samples(opened: dict[str, ZarrReader]) -> None:
    """SystemExit unless every path reads the first sample's values exactly as ``direct`` does."""
    reference = opened["direct"].read(0)
    for name, reader in opened.items():
        sample = reader.read(0)
        for stride, value in reference.features.items():
            other = sample.features[stride]
            parts = value.parts if hasattr(value, "parts") else {"map": value}
            others = other.parts if hasattr(other, "parts") else {"map": other}
            for part, array in parts.items():
                if not np.array_equal(np.asarray(array), np.asarray(others[part])):
                    raise SystemExit(f"{name} reads sample 0 stride {stride} part {part} differently from direct")


def bench(store: Path, rounds: int) -> dict:
    """Per path: median samples/s over ``rounds`` timed rounds (after one warm-up round); each path's rate over
    ``direct``'s with its interval."""
    opened = readers(store)
    same_samples(opened)
    samples = len(opened["direct"])
    names = list(opened)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds + 1):
        order = list(range(samples))
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed = read_all(opened[name], order)
            if round_index:
                seconds[name].append(elapsed)
    rates = {name: [samples / s for s in values] for name, values in seconds.items()}
    figures = {"samples": samples, "rounds": rounds, "paths": names,
               "samples_per_s": {name: statistics.median(values) for name, values in rates.items()},
               "ms_per_sample": {name: 1e3 * statistics.median(values) / samples for name, values in seconds.items()}}
    for name in names[1:]:
        figures[f"{name}_over_direct"] = ratio_of_medians(rates[name], rates["direct"])
        figures[f"{name}_over_direct_ci95"] = list(bootstrap_ratio_ci(rates[name], rates["direct"]))
    return figures


def paper_store(work: Path, images: int, short_side: int, max_size: int, variant: str) -> Path:
    """The paper pair's store (projected layout, the COCO recipe's codec, zarr) of ``images`` synthetic images."""
    pair = sized(PAIRS["paper"], short_side=short_side, max_size=max_size, variant=variant)
    data = synthetic_data(work / "data", images, max_size)
    return Path(extract(extract_config(pair, data, work / "paper.zarr", batch_size=1, samples_per_shard=64,
                                       device="cpu")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="an existing zarr store (default: the paper pair's, built here)")
    parser.add_argument("--images", type=int, default=8, help="images of the built store (default 8)")
    parser.add_argument("--short-side", dest="short_side", type=int, default=PAIRS["paper"].short_side)
    parser.add_argument("--max-size", dest="max_size", type=int, default=PAIRS["paper"].max_size)
    parser.add_argument("--variant", default=PAIRS["paper"].variant, help="the teacher's width (full, tiny)")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--out", type=Path, help="folder for the result file (benchmarks.results' name)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="zarr_pipeline_") as tmp:
        store = args.store or paper_store(Path(tmp), args.images, args.short_side, args.max_size, args.variant)
        summary = open_store(store).manifest
        result = {"store": {"path": str(args.store) if args.store else "paper pair (built)", "codec": summary.codec,
                            "layout": summary.layout, "levels": [level.stride for level in summary.levels],
                            "short_side": args.short_side, "max_size": args.max_size},
                  "zarr": zarr.__version__, **bench(store, args.rounds)}
    try:
        from importlib.metadata import version
        result["zarrs"] = version("zarrs")
    except Exception:
        result["zarrs"] = None
    result["provenance"] = provenance("zarr_pipeline", "paper" if args.store is None else "store", "cpu",
                                      result["store"]["codec"], f"cpu, {os.cpu_count()} CPUs")
    line = json.dumps(result)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / result_name(result["provenance"])).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
