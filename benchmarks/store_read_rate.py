"""Read rate of training from a store alone: local directory vs loopback S3 vs the student's consumption.

    nice -n 10 python -m benchmarks.store_read_rate --threads 1
    python -m benchmarks.store_read_rate --images 256 --rounds 5 --workers 4

One run, side by side: a WebDataset store written with ``extract --with-images`` (the tiny pair:
random-init Swin-T tiny teacher, int8, stride levels P3..P6, 2 views) is read through the training
loader exactly as ``train --features STORE`` without ``--data`` builds it (StoreStream over
StoreImages: tar shards streamed, JPEGs decoded and replayed through their views, teacher features
decoded), from the local directory and from the same bytes uploaded to a loopback S3 server (moto,
the store tests' server, in its own process); rounds interleave the two, the first epoch of each
loader (worker start, first connection) is left out, medians are reported. The consumption is the
student's offline PKD training step (RetinaNet R18 tiny, forward, PKD loss, backward, optimiser step)
on batches already in memory: the rate the loader has to keep up with. Prints a table, then one JSON line.

moto is a Python server on the same CPU: the S3 figure is what this client path reaches against it,
not what a real object store would serve.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.pairs import PAIRS, extract_config, sized, synthetic_data
from pkd_offline.data import collate
from pkd_offline.engine import Distillation, training_step
from pkd_offline.levels import pair_levels
from pkd_offline.models import build_detector
from stages.extract import extract
from pkd_offline.store_data import StoreStream, store_dataset, store_views
from storage import describe, open_store
from storage.files import close_object_store_sessions


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def loopback_s3_server(bucket: str, scratch: Path):
    """moto's S3 server in its own process on 127.0.0.1, this process pointed at it through the standard AWS
    environment only (as ``tests/loopback_s3.py`` does, config files pointed away); yields an s3fs filesystem."""
    import s3fs

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nowhere = str(scratch / "absent")
    saved = dict(os.environ)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_CONFIG_FILE": nowhere, "AWS_SHARED_CREDENTIALS_FILE": nowhere,
                       "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"})
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        os.environ.pop(name, None)
    try:
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        for _ in range(300):  # the server process is up when it answers (at most 30 s)
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.1):
                break
            time.sleep(0.1)
        fs.mkdir(bucket)
        yield fs
    finally:
        close_object_store_sessions()
        server.terminate()
        server.wait(timeout=30)
        os.environ.clear()
        os.environ.update(saved)


def make_store(args, work: Path) -> Path:
    """The tiny pair's stride levels P3..P6 with the images, as a WebDataset store."""
    data = synthetic_data(work / "data", args.images, args.image_size)
    pair = sized(PAIRS["tiny"], teacher_levels="3,4,5,6", short_side=args.image_size, max_size=args.image_size)
    return extract(extract_config(pair, data, work / "wds", store_format="wds", batch_size=8, workers=args.workers,
                                  samples_per_shard=args.samples_per_shard, with_images=True, overwrite=False))


def loader_for(path: str, args) -> DataLoader:
    """The loader ``train`` builds for a store alone (persistent workers here, so epochs after the first time
    reading, not worker start-up)."""
    dataset = store_dataset(path, store_views(path), "retinanet")
    return DataLoader(StoreStream(dataset, path, seed=0), batch_size=args.batch_size, collate_fn=collate,
                      num_workers=args.workers, persistent_workers=args.workers > 0)


def read_rate(loader: DataLoader, epochs: int) -> float:
    """Samples/s over ``epochs`` epochs after a first, untimed one."""
    for _ in loader:
        pass
    tick, count = time.perf_counter(), 0
    for _ in range(epochs):
        for batch in loader:
            count += len(batch)
    return count / (time.perf_counter() - tick)


def consumption_rate(path: str, args) -> float:
    """Samples/s of the student's offline PKD training step on batches already in memory."""
    torch.manual_seed(0)
    batches = []
    for batch in loader_for(path, args):
        batches.append(batch)
        if len(batches) == args.steps:
            break
    dataset = store_dataset(path, store_views(path), "retinanet")
    model = build_detector("retinanet", num_classes=dataset.num_classes, variant="tiny", backbone="resnet18")
    strides = [level.stride for level in open_store(path).manifest.levels]
    distill = Distillation(pair_levels(list(model.strides), strides, "stride")[:4], 6.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    device = torch.device("cpu")
    training_step(model, batches[0], optimizer, device=device, distill=distill, size_divisor=32)  # warm-up
    tick = time.perf_counter()
    for batch in batches:
        training_step(model, batch, optimizer, device=device, distill=distill, size_divisor=32)
    return sum(len(b) for b in batches) / (time.perf_counter() - tick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="training images (2 views each are stored)")
    parser.add_argument("--image-size", dest="image_size", type=int, default=160, help="long side, px")
    parser.add_argument("--samples-per-shard", dest="samples_per_shard", type=int, default=16)
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (train's default: 2)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per reading, after an untimed one")
    parser.add_argument("--rounds", type=int, default=3, help="local and S3 readings, interleaved")
    parser.add_argument("--steps", type=int, default=6, help="training steps timed for the consumption")
    parser.add_argument("--threads", type=int, help="torch threads of the training step (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="pkd-read-rate-") as scratch:
        work = Path(scratch)
        local = make_store(args, work)
        store_bytes = describe(open_store(str(local)))["bytes_total"]
        consumption = consumption_rate(str(local), args)
        with loopback_s3_server("pkd-read-rate", work) as fs:
            url = "s3://pkd-read-rate/wds/"
            fs.put(str(local), url.rstrip("/"), recursive=True)
            assert describe(open_store(url))["digest"] == describe(open_store(str(local)))["digest"]
            rates: dict[str, list[float]] = {"local": [], "s3": []}
            for _ in range(args.rounds):
                for name, path in (("local", str(local)), ("s3", url)):
                    loader = loader_for(path, args)
                    rates[name].append(read_rate(loader, args.epochs))
                    del loader  # its persistent workers end here
    read = {name: statistics.median(values) for name, values in rates.items()}
    figures = {
        "images": args.images, "samples_in_store": args.images * 2, "store_bytes": store_bytes,
        "image_size_px": args.image_size, "batch_size": args.batch_size, "workers": args.workers,
        "torch_threads": torch.get_num_threads(),
        "read_samples_per_s_local": round(read["local"], 1), "read_samples_per_s_s3": round(read["s3"], 1),
        "read_rounds_local": [round(v, 1) for v in rates["local"]],
        "read_rounds_s3": [round(v, 1) for v in rates["s3"]],
        "consumption_samples_per_s": round(consumption, 1),
        "s3_over_local": round(read["s3"] / read["local"], 3),
        "local_over_consumption": round(read["local"] / consumption, 2),
        "s3_over_consumption": round(read["s3"] / consumption, 2),
    }
    print(f"{'source':<34}{'samples/s':>12}{'over consumption':>20}")
    print(f"{'local WebDataset store':<34}{read['local']:>12.1f}{read['local'] / consumption:>19.2f}x")
    print(f"{'same store on loopback S3 (moto)':<34}{read['s3']:>12.1f}{read['s3'] / consumption:>19.2f}x")
    print(f"{'student offline PKD step':<34}{consumption:>12.1f}")
    print(f"S3 over local: {read['s3'] / read['local']:.3f}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
