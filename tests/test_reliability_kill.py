"""SIGKILL at fixed points of progress, then resume: the result equals an uninterrupted run's, sample for sample.

Each test runs the real command line (``python -m pkd_offline``) in a subprocess, watches its progress on
disk (the store's manifest and ``shards/`` completion markers, the training log), and kills it with
SIGKILL as soon as the watched point is reached: no sleeps, no timing. Each kill point leaves enough work
after it (several shards or steps, seconds of compute) that the process cannot finish first; where exactly
in the next shard or step the kill lands is not fixed (the test prints what it found on disk).
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pkd_offline.checkpoint import load_checkpoint
from stages.extract import ExtractConfig, extract
from stages.train import TrainConfig, train
from storage import open_store

# Two views, one sample per shard, batches of one: 16 samples in 16 shards, so kills land between shards.
EXTRACT_FLAGS = ["--teacher", "swin", "--random-init", "--variant", "tiny", "--short-side", "128", "--max-size", "128",
                 "--workers", "0", "--samples-per-shard", "1", "--views", "2", "--batch-size", "1", "--no-progress"]
N_SHARDS = 16
# Faster R-CNN (it draws from the global RNG), 8 images in batches of 2: 4 steps an epoch, 8 steps in all.
TRAIN_FLAGS = ["--student", "fasterrcnn", "--backbone", "resnet18", "--variant", "tiny", "--short-side", "64",
               "--max-size", "64", "--batch-size", "2", "--workers", "0", "--optimizer", "adamw", "--lr", "1e-3",
               "--warmup-iters", "1", "--val-split", "", "--iters", "8", "--checkpoint-every", "1", "--no-progress"]


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "pkd_offline", *map(str, args)]


def run_to_end(args: list[str], log: Path) -> None:
    with open(log, "w") as stderr:
        result = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=stderr, timeout=300)
    assert result.returncode == 0, log.read_text()


def run_and_kill(args: list[str], reached, log: Path, timeout: float = 300) -> None:
    """Start ``args`` and SIGKILL it as soon as ``reached()`` holds (polled every 5 ms).

    Fails if the process ends on its own first: the kill point must leave it work to do.
    """
    with open(log, "w") as stderr:
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + timeout
        try:
            while process.poll() is None and not reached():
                assert time.monotonic() < deadline, f"{args[3]} did not reach its kill point in {timeout} s"
                time.sleep(0.005)  # polling interval, not a delay standing in for an event
            assert process.poll() is None, f"{args[3]} ended before its kill point: {log.read_text()[-2000:]}"
            process.send_signal(signal.SIGKILL)
            process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == -signal.SIGKILL


def markers(store: Path) -> int:
    directory = store / "shards"
    return len(list(directory.glob("[0-9]*.json"))) if directory.is_dir() else 0


def inspect_json(store: Path) -> dict:
    result = subprocess.run(cli("inspect", store, "--json"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# Kill points of the extraction runs, in order: once the store exists (its manifest is written, no shard
# finished: a kill during store set-up or the first shard), then once 2, 5 and 9 of the 16 shards are marked done.
EXTRACT_KILLS = [("store created", lambda store: (store / "manifest.json").exists()),
                 ("2 shards done", lambda store: markers(store) >= 2),
                 ("5 shards done", lambda store: markers(store) >= 5),
                 ("9 shards done", lambda store: markers(store) >= 9)]


@pytest.mark.parametrize("fmt", ["zarr", pytest.param("wds", marks=pytest.mark.slow)])
def test_extract_killed_at_fixed_points_resumes_to_the_same_store(synth_data, tmp_path, fmt):
    name = "f.zarr" if fmt == "zarr" else "f"
    reference, killed = tmp_path / "reference" / name, tmp_path / "killed" / name
    run_to_end(cli("extract", *EXTRACT_FLAGS, "--data", synth_data, "--out", reference), tmp_path / "reference.log")
    found = []
    for attempt, (point, reached) in enumerate(EXTRACT_KILLS):
        run_and_kill(cli("extract", *EXTRACT_FLAGS, "--data", synth_data, "--out", killed),
                     lambda: reached(killed), tmp_path / f"kill{attempt}.log")
        found.append(markers(killed))
    print(f"{fmt}: shards done when killed at {[point for point, _ in EXTRACT_KILLS]}: {found}")
    assert found[0] < 2 and 2 <= found[1] < 5 <= found[2] < 9 <= found[3] < N_SHARDS, found
    run_to_end(cli("extract", *EXTRACT_FLAGS, "--data", synth_data, "--out", killed), tmp_path / "final.log")

    expected, resumed = inspect_json(reference), inspect_json(killed)
    assert resumed["digest"] == expected["digest"] and resumed["samples"] == expected["samples"] == 16
    want, got = open_store(str(reference)), open_store(str(killed))
    assert [r.sha256 for r in got.manifest.shards] == [r.sha256 for r in want.manifest.shards], \
        "a resumed shard differs byte for byte from the uninterrupted one"
    keys = [(s.index, s.image_id, s.view_index) for s in got.iter_samples()]
    assert keys == [(2 * i + v, image_id, v) for i, image_id in enumerate(want.manifest.image_ids) for v in (0, 1)], \
        "samples missing, duplicated or out of place"
    assert got.verify_shards() == []


@pytest.fixture(scope="module")
def small_store(synth_data, tmp_path_factory) -> Path:
    return extract(ExtractConfig(teacher="swin", random_init=True, variant="tiny", data=synth_data,
                                 out=tmp_path_factory.mktemp("train-store") / "f.zarr", views=1, short_side=64,
                                 max_size=64, batch_size=4, workers=0, samples_per_shard=2, progress=False))


def log_iters(run: Path) -> list[int]:
    path = run / "log.jsonl"
    return [json.loads(line)["iter"] for line in path.read_text().splitlines() if line.endswith("}")] \
        if path.exists() else []


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_killed_after_a_checkpoint_resumes_to_the_same_losses(synth_data, small_store, tmp_path):
    common = [*TRAIN_FLAGS, "--data", synth_data, "--features", small_store]
    run_to_end(cli("train", *common, "--out", tmp_path / "straight"), tmp_path / "straight.log")
    run = tmp_path / "resumed"
    # Killed once step 2 is logged (epoch 0), then, resumed, once step 5 is logged (epoch 1): each kill lands
    # between that step's log line and the end of the next step (perhaps inside a checkpoint write).
    found = []
    for attempt, steps in enumerate((2, 5)):
        resume = ["--resume"] if attempt else []
        run_and_kill(cli("train", *common, "--out", run, *resume), lambda: len(log_iters(run)) >= steps,
                     tmp_path / f"kill{attempt}.log")
        found.append((len(log_iters(run)), load_checkpoint(run / "last.pt")["iteration"]))
    print("(steps logged, checkpoint iteration) at each kill:", found)
    # The checkpoint of a step is written just after its log line: at most one step behind the log.
    assert all(logged - 1 <= iteration <= logged < 8 for logged, iteration in found) and found[1][0] >= 5, found
    run_to_end(cli("train", *common, "--out", run, "--resume"), tmp_path / "final.log")
    assert log_iters(run) == list(range(1, 9)), found
    assert losses(run) == losses(tmp_path / "straight"), f"resumed losses differ; kills: {found}"
    first = load_checkpoint(tmp_path / "straight" / "model.pt")["model"]
    second = load_checkpoint(run / "model.pt")["model"]
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


SMALL = dict(student="retinanet", backbone="resnet18", variant="tiny", short_side=64, max_size=64, batch_size=2,
             workers=0, optimizer="adamw", lr=1e-3, warmup_iters=1, val_split=None, iters=2, progress=False)


def test_resume_before_the_first_checkpoint_restarts_the_log(synth_data, tmp_path):
    # What a kill after step 1 is logged but before any checkpoint is written leaves behind.
    train(TrainConfig(data=synth_data, out=tmp_path, stop_after=1, checkpoint_every=100, **SMALL))
    (tmp_path / "last.pt").unlink()
    train(TrainConfig(data=synth_data, out=tmp_path, resume=True, checkpoint_every=100, **SMALL))
    assert log_iters(tmp_path) == [1, 2]


def test_resume_survives_a_torn_log_line(synth_data, tmp_path):
    train(TrainConfig(data=synth_data, out=tmp_path, stop_after=1, checkpoint_every=1, **SMALL))
    with open(tmp_path / "log.jsonl", "a") as log:
        log.write('{"iter": 2, "epoch": 0, "lr": 0.00')
    train(TrainConfig(data=synth_data, out=tmp_path, resume=True, checkpoint_every=1, **SMALL))
    assert log_iters(tmp_path) == [1, 2]
    assert all(line.endswith("}") for line in (tmp_path / "log.jsonl").read_text().splitlines())
