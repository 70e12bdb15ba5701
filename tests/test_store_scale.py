"""Training from stores alone on object storage at scale: 2 ranks x 2 DataLoader workers under torchrun (gloo, CPU),
the train and val stores on the loopback S3 server, no file of the data set on the training side. Each reader
(rank, worker) streams its own shards, recorded on the ranks themselves; resume after a stop; rank 0 alone prints
the result path; stderr is empty (no "Unclosed client session" from s3fs at exit, on a busy machine too)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from loopback_s3 import loopback_s3  # noqa: E402
from stages.synth import SynthConfig, synth  # noqa: E402
from storage import open_store  # noqa: E402
from test_distributed import free_port  # noqa: E402
from test_store_alone import extract_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "pkd-scale"

# Runs the real CLI under torchrun; records, in the process that reads, every shard a store reader streams:
# {"rank", "worker" (DataLoader worker id, None in the rank's own process), "pid", "store", "shards"}.
PROBE = '''
import json, os, sys
from torch.utils.data import get_worker_info
from storage.base import StoreReader
from pkd_offline.cli import main

log_dir, iter_samples = sys.argv[1], StoreReader.iter_samples

def recording_iter_samples(self, shard_indices=None):
    shards = list(shard_indices)
    info = get_worker_info()
    record = {"rank": int(os.environ["RANK"]), "worker": None if info is None else info.id, "pid": os.getpid(),
              "store": self.root, "shards": shards}
    with open(os.path.join(log_dir, f"reads-{os.getpid()}.jsonl"), "a") as handle:
        handle.write(json.dumps(record) + "\\n")
    return iter_samples(self, shards)

StoreReader.iter_samples = recording_iter_samples
sys.exit(main(sys.argv[2:]))
'''


def launch(cwd: Path, *args: str, probe: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2`` of the probe (or of the plain CLI), in ``cwd``, with this process's
    environment (the S3 endpoint)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    target = [str(cwd / "probe.py"), str(cwd / "reads")] if probe else ["-m", "pkd_offline"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), *target, *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """Train and val stores (--with-images) on the loopback S3 server, the val store extracted by 2 ranks; the data
    set they came from deleted."""
    scratch = tmp_path_factory.mktemp("scale")
    with loopback_s3(BUCKET, scratch) as fs:
        data = synth(SynthConfig(out=scratch / "data", train=8, val=4, image_size=96, seed=11))
        train_url, val_url = f"s3://{BUCKET}/train/", f"s3://{BUCKET}/val/"
        extract_store(data, train_url, short_side=96, max_size=96, samples_per_shard=2)
        val_extract = launch(scratch, "extract", "--teacher", "swin", "--random-init", "--variant", "tiny", "--data",
                             str(data), "--split", "val", "--out", val_url, "--format", "wds", "--with-images",
                             "--views", "2", "--short-side", "96", "--max-size", "96", "--samples-per-shard", "2",
                             "--workers", "0", "--no-progress", probe=False)
        assert val_extract.returncode == 0, val_extract.stderr[-3000:]
        shutil.rmtree(data)
        yield {"fs": fs, "train": train_url, "val": val_url, "scratch": scratch, "val_extract": val_extract}


@pytest.mark.slow
def test_two_ranks_two_workers_train_and_evaluate_from_s3_alone_and_resume(remote, tmp_path):
    assert remote["val_extract"].stdout.splitlines() == [remote["val"]], "rank 0 alone prints the store"
    train_store, val_store = open_store(remote["train"]), open_store(remote["val"])
    assert (train_store.manifest.n_shards, val_store.manifest.n_shards) == (8, 4)
    (tmp_path / "probe.py").write_text(PROBE)
    (tmp_path / "reads").mkdir()
    run = tmp_path / "run"
    args = ["train", "--student", "retinanet", "--backbone", "resnet18", "--variant", "tiny", "--features",
            remote["train"], "--val-store", remote["val"], "--eval-every", "2", "--iters", "4", "--batch-size", "2",
            "--workers", "2", "--optimizer", "adamw", "--lr", "0.001", "--warmup-iters", "1", "--out", "run",
            "--no-progress"]
    first = launch(tmp_path, *args, "--stop-after", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.splitlines() == ["run/last.pt"], "rank 0 alone prints the result path"
    second = launch(tmp_path, *args, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.splitlines() == ["run/model.pt"]
    assert first.stderr == second.stderr == "", first.stderr[-3000:] + second.stderr[-3000:]

    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == [1, 2, 3, 4] and [r["epoch"] for r in log] == [0, 0, 1, 1]
    assert all(r["loss_pkd"] > 0 for r in log)
    assert [json.loads(line)["iter"] for line in (run / "eval.jsonl").read_text().splitlines()] == [2, 4]
    # Nothing of the data set on the training side: the run's directory holds what training wrote, no more.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.py", "reads", "run"]
    assert sorted(p.name for p in run.iterdir()) == ["eval.jsonl", "last.pt", "log.jsonl", "model.pt"]

    reads = [json.loads(line) for path in sorted((tmp_path / "reads").iterdir())
             for line in path.read_text().splitlines()]
    training = [r for r in reads if r["store"] == remote["train"].rstrip("/")]
    evaluation = [r for r in reads if r["store"] == remote["val"].rstrip("/")]
    assert len(training) + len(evaluation) == len(reads)
    # Training: 4 readers (2 ranks x 2 DataLoader workers), each always the same shards, the readers' shards
    # disjoint and together every shard.
    assert all(r["worker"] is not None for r in training)
    by_reader: dict[tuple[int, int], set[int]] = {}
    for r in training:
        by_reader.setdefault((r["rank"], r["worker"]), set()).update(r["shards"])
    assert sorted(by_reader) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert by_reader == {(rank, worker): {k for k in range(8) if k % 4 == rank * 2 + worker}
                         for rank in (0, 1) for worker in (0, 1)}
    for pid in {r["pid"] for r in training}:  # a worker process is one reader (a new one each epoch)
        assert len({(r["rank"], r["worker"]) for r in training if r["pid"] == pid}) == 1
    # Evaluation (in each rank's own process): rank r streams val shards r and r + 2, at each of the 2 evaluations.
    assert all(r["worker"] is None for r in evaluation)
    for rank in (0, 1):
        assert sorted(k for r in evaluation if r["rank"] == rank for k in r["shards"]) == sorted([rank, rank + 2] * 2)


# A busy machine, simulated: s3fs's own close at exit (a finalizer that waits 0.1 s for its event loop) gets no
# time, and the session is collected afterwards, as at interpreter shutdown.
BUSY_EXIT = '''
import gc, sys
import fsspec.asyn, s3fs.core
from pkd_offline.cli import main

waited = s3fs.core.sync
def no_time(loop, func, *args, timeout=None, **kwargs):
    if timeout is not None:
        raise fsspec.asyn.FSTimeoutError
    return waited(loop, func, *args, **kwargs)

s3fs.core.sync = no_time
code = main(sys.argv[1:])
s3fs.S3FileSystem.clear_instance_cache()
gc.collect()
sys.exit(code)
'''


def test_no_unclosed_client_session_at_exit_on_a_busy_machine(remote, tmp_path):
    script = tmp_path / "busy_exit.py"
    script.write_text(BUSY_EXIT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(script), "inspect", remote["val"]], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0 and "digest" in result.stdout, result.stderr[-2000:]
    assert result.stderr == ""
