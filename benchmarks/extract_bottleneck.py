"""Where `extract` spends its time on a GPU node: the host-side rates it depends on, measured side by side.

    python -m benchmarks.extract_bottleneck [--data DIR]   # prints one JSON line

Measures, on this machine: write rate of a 1 GB file (written, then fsync'd) to the scratch folder and to
/dev/shm; zstd level 3 (the stores' compressor) on a 256-channel fp16 map, on 1 thread and on 8 in
parallel; sha256 (shard hashes); and, with ``--data`` (a synthetic set), the steady rate of
``pkd-offline extract`` (the paper pair, ``benchmarks.pairs``, on CUDA) into the scratch folder and into /dev/shm,
from each run's record (``--record``). If the
/dev/shm extraction is much faster, the disk is the bottleneck; if both match the zstd rate times the
writer threads, compression is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from numcodecs import Zstd

from benchmarks.pairs import PAIRS, extract_command, extract_config

ROOT = Path(__file__).resolve().parents[1]


def write_rate(folder: Path, total: int = 2**30, chunk: int = 64 * 2**20) -> float:
    """MB/s writing ``total`` bytes in ``chunk`` pieces, fsync included."""
    block = np.random.default_rng(0).integers(0, 255, chunk, dtype=np.uint8).tobytes()
    path = folder / "write_rate.bin"
    tick = time.perf_counter()
    with open(path, "wb") as handle:
        for _ in range(total // chunk):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - tick
    path.unlink()
    return total / seconds / 1e6


def compress_rates(threads: int) -> dict:
    """MB/s of raw fp16 through zstd level 3, one thread and ``threads`` at once; and the compressed fraction."""
    rng = np.random.default_rng(0)
    raw = (rng.standard_normal((256, 200, 334)) * 0.5).astype(np.float16).tobytes()
    codec = Zstd(level=3)
    tick = time.perf_counter()
    compressed = codec.encode(raw)
    single = len(raw) / (time.perf_counter() - tick) / 1e6
    with ThreadPoolExecutor(threads) as pool:
        tick = time.perf_counter()
        list(pool.map(codec.encode, [raw] * threads * 2))
        parallel = 2 * threads * len(raw) / (time.perf_counter() - tick) / 1e6
    tick = time.perf_counter()
    hashlib.sha256(raw).hexdigest()
    sha = len(raw) / (time.perf_counter() - tick) / 1e6
    return {"zstd_mb_per_s_1_thread": single, f"zstd_mb_per_s_{threads}_threads": parallel,
            "zstd_fraction": len(compressed) / len(raw), "sha256_mb_per_s": sha}


def extract_rate(data: Path, out: Path) -> float | None:
    """Steady samples/s of ``pkd-offline extract`` into ``out``: its record's rate past the pca fit."""
    cfg = extract_config(PAIRS["paper"], data, out, batch_size=8, workers=8, device="cuda", samples_per_shard=4)
    with tempfile.TemporaryDirectory() as scratch:
        command, record = extract_command(cfg, Path(scratch), "extract")
        subprocess.run([sys.executable, "-m", "pkd_offline", *command], capture_output=True, text=True, cwd=ROOT,
                       check=True)
        return json.loads(record.read_text())["steady_samples_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    figures: dict = {"cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as scratch, tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        figures["write_mb_per_s"] = {"scratch": write_rate(Path(scratch)), "dev_shm": write_rate(Path(shm))}
        print(json.dumps(figures), flush=True)
        figures.update(compress_rates(args.threads))
        print(json.dumps(figures), flush=True)
        if args.data:
            figures["extract_img_per_s"] = {"scratch": extract_rate(args.data, Path(scratch) / "f.zarr"),
                                            "dev_shm": extract_rate(args.data, Path(shm) / "f.zarr")}
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
