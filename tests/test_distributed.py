"""torchrun on CPU (gloo): 2-process extraction equals 1-process extraction; 2-process DDP training runs."""

import json
import os
import subprocess
import sys

import pytest

EXTRACT = ["extract", "--teacher", "swin", "--random-init", "--variant", "tiny", "--short-side", "96", "--max-size",
           "96", "--views", "2", "--samples-per-shard", "2", "--workers", "0", "--no-progress"]
# Bitwise equality needs the same float reduction order, i.e. the same intra-op thread count per process.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def launch(nproc: int, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(29500 + os.getpid() % 1000), "-m", "pkd_offline", *args]
    if nproc == 1:
        command = [sys.executable, "-m", "pkd_offline", *args]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)


def digest(store) -> dict:
    result = subprocess.run([sys.executable, "-m", "pkd_offline", "inspect", str(store), "--json"],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    subprocess.run([sys.executable, "-m", "pkd_offline", "data", "synth", "--out", str(out), "--train", "6", "--val",
                    "2", "--image-size", "96"], check=True, capture_output=True)
    return out


@pytest.mark.parametrize("store_name", ["f.zarr", "wds"])
def test_two_ranks_write_the_same_store_as_one(small_data, tmp_path, store_name):
    one, two = tmp_path / "one" / store_name, tmp_path / "two" / store_name
    assert launch(1, *EXTRACT, "--data", str(small_data), "--out", str(one)).returncode == 0
    result = launch(2, *EXTRACT, "--data", str(small_data), "--out", str(two))
    assert result.returncode == 0, result.stderr[-2000:]
    first, second = digest(one), digest(two)
    assert first["samples"] == second["samples"] == 12
    assert first["digest"] == second["digest"]


def test_two_process_ddp_training_from_a_store(small_data, tmp_path):
    store = tmp_path / "f.zarr"
    assert launch(1, *EXTRACT, "--data", str(small_data), "--out", str(store)).returncode == 0
    run = tmp_path / "run"
    result = launch(2, "train", "--student", "retinanet", "--backbone", "resnet18", "--variant", "tiny", "--data",
                    str(small_data), "--out", str(run), "--iters", "3", "--batch-size", "2", "--workers", "0",
                    "--features", str(store), "--eval-every", "3", "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == [1, 2, 3], "rank 0 alone writes the log"
    assert all(r["loss_pkd"] > 0 for r in log)
    evaluation = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["iter"] for e in evaluation] == [3]
    assert (run / "model.pt").is_file()
