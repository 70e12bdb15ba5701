"""torchrun on CPU (gloo): 2-process extraction equals 1-process extraction; 2-process DDP training keeps the
ranks' weights equal, gives each rank its own data, and gathers an evaluation equal to a single-process one."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pkd_offline.checkpoint import load_checkpoint
from pkd_offline.data import CocoDetection
from pkd_offline.evaluate import coco_box_ap, predict
from pkd_offline.models import build_detector
from pkd_offline.views import View
from storage import open_store

ROOT = Path(__file__).resolve().parents[1]
EXTRACT = ["extract", "--teacher", "swin", "--random-init", "--variant", "tiny", "--short-side", "96", "--max-size",
           "96", "--views", "2", "--samples-per-shard", "2", "--workers", "0", "--no-progress"]
# Bitwise equality needs the same float reduction order, i.e. the same intra-op thread count per process.
# PYTHONPATH: the launched processes import this checkout (also a script started by path).
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

# Runs the real CLI under torchrun, recording on each rank what the test cannot see from outside:
# the (image id, view) keys of every training batch, the weights after the last step, and the gathered evaluation.
PROBE = '''
import json, os, sys
from pathlib import Path
import torch
import pkd_offline.engine as engine
import stages.train as train_stage
from pkd_offline.cli import main

out, rank = Path(sys.argv[1]), int(os.environ["RANK"])
batches, step, steps, gather = [], engine.training_step, train_stage.train_steps, train_stage.gather_lists

def recording_step(model, batch, *args, **kwargs):
    batches.append([[item["image_id"], item["view_index"]] for item in batch])
    return step(model, batch, *args, **kwargs)

def saving_steps(model, *args, **kwargs):
    state = steps(model, *args, **kwargs)
    module = getattr(model, "module", model)
    torch.save({name: value.detach() for name, value in module.named_parameters()}, out / f"weights{rank}.pt")
    (out / f"batches{rank}.json").write_text(json.dumps(batches))
    return state

def recording_gather(values, ranks):
    gathered = gather(values, ranks)
    (out / f"gathered{rank}.json").write_text(json.dumps(gathered))
    return gathered

engine.training_step, train_stage.train_steps, train_stage.gather_lists = recording_step, saving_steps, recording_gather
sys.exit(main(sys.argv[2:]))
'''


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it: bind to port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(nproc: int, *args: str, script: Path | None = None) -> subprocess.CompletedProcess:
    target = [str(script)] if script else ["-m", "pkd_offline"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), *target, *args]
    if nproc == 1 and script is None:
        command = [sys.executable, "-m", "pkd_offline", *args]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)


def digest(store) -> dict:
    result = subprocess.run([sys.executable, "-m", "pkd_offline", "inspect", str(store), "--json"],
                            capture_output=True, text=True, check=True, env=ENV)
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    subprocess.run([sys.executable, "-m", "pkd_offline", "data", "synth", "--out", str(out), "--train", "6", "--val",
                    "2", "--image-size", "96"], check=True, capture_output=True, env=ENV)
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
    # Rank 0 writes the manifest after every rank's shards and markers.
    files = [p for p in two.rglob("*") if p.is_file() and p.name != "manifest.json"]
    assert (two / "manifest.json").stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in files)
    # Resume per rank: shards 1 (rank 1's) and 2 (rank 0's) unfinished, the manifest not yet written;
    # the same 2-process command redoes exactly those two shards and gives the same store.
    manifest = json.loads((two / "manifest.json").read_text())
    (two / "manifest.json").write_text(json.dumps({**manifest, "shards": []}))
    for k in (1, 2):
        (two / "shards" / f"{k:06d}.json").unlink()
    before = {p: p.stat().st_mtime_ns for p in files if "shards" not in p.relative_to(two).parts}
    result = launch(2, *EXTRACT, "--data", str(small_data), "--out", str(two))
    assert result.returncode == 0, result.stderr[-2000:]
    assert digest(two)["digest"] == first["digest"]
    rewritten = {p for p, mtime in before.items() if p.stat().st_mtime_ns != mtime}
    store = open_store(str(two))
    assert rewritten == {Path(path) for k in (1, 2) for path in store.shard_paths(k)}


def test_two_ranks_fit_one_pca_basis_and_write_the_same_store_as_one(small_data, tmp_path):
    """Rank 0 fits the basis before any shard; rank 1 encodes with the one the store holds."""
    one, two = tmp_path / "one" / "f.zarr", tmp_path / "two" / "f.zarr"
    assert launch(1, *EXTRACT, "--codec", "pca", "--data", str(small_data), "--out", str(one)).returncode == 0
    result = launch(2, *EXTRACT, "--codec", "pca", "--data", str(small_data), "--out", str(two))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (one / "codec_side.npz").read_bytes() == (two / "codec_side.npz").read_bytes()
    assert digest(one)["digest"] == digest(two)["digest"]


def test_two_process_ddp_training_from_a_store(small_data, tmp_path):
    store = tmp_path / "f.zarr"
    assert launch(1, *EXTRACT, "--data", str(small_data), "--out", str(store)).returncode == 0
    run, probe = tmp_path / "run", tmp_path / "probe.py"
    probe.write_text(PROBE)
    # Faster R-CNN: its untrained box head scores above the 0.05 threshold, so the evaluation has detections.
    result = launch(2, str(tmp_path), "train", "--student", "fasterrcnn", "--backbone", "resnet18", "--variant",
                    "tiny", "--data", str(small_data), "--out", str(run), "--iters", "3", "--batch-size", "2",
                    "--workers", "0", "--features", str(store), "--eval-every", "3", "--lr", "0.002", "--no-progress",
                    script=probe)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [str(run / "model.pt")], "rank 0 alone prints the result path"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == [1, 2, 3], "rank 0 alone writes the log"
    assert all(r["loss_pkd"] > 0 for r in log)

    # DDP: after 3 steps both ranks hold the same weights (parameters), bit for bit, and model.pt holds them.
    # (Buffers such as batch-norm running statistics are rank 0's: DDP broadcasts them before each forward.)
    weights = [torch.load(tmp_path / f"weights{rank}.pt", weights_only=True) for rank in (0, 1)]
    saved = load_checkpoint(run / "model.pt")["model"]
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) > 50
    assert all(torch.equal(weights[0][k], weights[1][k]) and torch.equal(weights[0][k], saved[k]) for k in weights[0])

    # Each rank trains on its own half: 3 of the 6 images per epoch (batches of 2 and 1), disjoint, all covered.
    batches = [json.loads((tmp_path / f"batches{rank}.json").read_text()) for rank in (0, 1)]
    assert [len(b) for b in batches[0]] == [len(b) for b in batches[1]] == [2, 1, 2]
    first_epoch = [{image_id for batch in b[:2] for image_id, _ in batch} for b in batches]
    image_ids = sorted(json.loads((small_data / "annotations" / "instances_train.json").read_text())["images"][i]["id"]
                       for i in range(6))
    assert not first_epoch[0] & first_epoch[1] and sorted(first_epoch[0] | first_epoch[1]) == image_ids

    # The evaluation split over ranks and gathered equals one process evaluating the same model alone.
    gathered = [json.loads((tmp_path / f"gathered{rank}.json").read_text()) for rank in (0, 1)]
    assert gathered[0] == gathered[1]
    content = load_checkpoint(run / "model.pt")
    val = CocoDetection(small_data, "val", [View.from_dict(content["views"][0])])
    model = build_detector("fasterrcnn", num_classes=val.num_classes, variant="tiny", backbone="resnet18")
    model.load_state_dict(content["model"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = predict(model, val, torch.device("cpu"), batch_size=1, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert {r["image_id"] for r in alone} == set(val.image_ids), "each val image must have detections"

    def key(r):
        return r["image_id"], r["category_id"], -r["score"], r["bbox"]

    assert len(gathered[0]) == len(alone)
    for got, want in zip(sorted(gathered[0], key=key), sorted(alone, key=key)):
        assert (got["image_id"], got["category_id"]) == (want["image_id"], want["category_id"])
        assert got["score"] == pytest.approx(want["score"], abs=1e-4)
        assert got["bbox"] == pytest.approx(want["bbox"], abs=0.05)
    evaluation = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["iter"] for e in evaluation] == [3]
    stats = coco_box_ap(val, alone)
    assert {k: evaluation[0][k] for k in stats} == pytest.approx(stats, abs=1e-6)
