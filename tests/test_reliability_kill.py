"""SIGKILL at seeded random points, then resume: the result equals an uninterrupted run's, sample for sample.

Each test runs the real command line (``python -m pkd_offline``) in a subprocess, watches its progress on
disk (the store's ``shards/`` completion markers, the training log), kills it with SIGKILL, and runs it
again. The kill points are drawn from ``random.Random(SEED)``, so a failure reproduces.
"""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pkd_offline.checkpoint import load_checkpoint
from stages.extract import ExtractConfig, extract
from stages.train import TrainConfig, train
from storage import open_store

SEED = 20240611
# Two views and batches of one: 16 samples in 8 shards, so kills can land between shards.
EXTRACT_FLAGS = ["--teacher", "swin", "--random-init", "--variant", "tiny", "--short-side", "128", "--max-size", "128",
                 "--workers", "0", "--samples-per-shard", "2", "--views", "2", "--batch-size", "1", "--no-progress"]
N_SHARDS = 8
TRAIN_FLAGS = ["--student", "retinanet", "--backbone", "resnet18", "--variant", "tiny", "--short-side", "64",
               "--max-size", "64", "--batch-size", "2", "--workers", "0", "--optimizer", "adamw", "--lr", "1e-3",
               "--warmup-iters", "1", "--val-split", "", "--iters", "4", "--checkpoint-every", "1", "--no-progress"]


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "pkd_offline", *map(str, args)]


def run_to_end(args: list[str], log: Path) -> None:
    with open(log, "w") as stderr:
        result = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=stderr, timeout=300)
    assert result.returncode == 0, log.read_text()


def run_and_kill(args: list[str], ready, extra_delay: float, log: Path, timeout: float = 300) -> bool:
    """Start ``args``; once ``ready()`` holds, wait ``extra_delay`` s and SIGKILL it.

    Returns True if it was killed, False if it finished first (then it must have succeeded).
    """
    with open(log, "w") as stderr:
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + timeout
        try:
            while process.poll() is None:
                if ready():
                    time.sleep(extra_delay)
                    if process.poll() is None:
                        process.send_signal(signal.SIGKILL)
                        process.wait()
                        return True
                    break
                assert time.monotonic() < deadline, f"{args[3]} did not reach its kill point in {timeout} s"
                time.sleep(0.005)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == 0, log.read_text()
    return False


def markers(store: Path) -> int:
    directory = store / "shards"
    return len(list(directory.glob("[0-9]*.json"))) if directory.is_dir() else 0


def inspect_json(store: Path) -> dict:
    result = subprocess.run(cli("inspect", store, "--json"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# (markers that must exist, extra delay range in s): 0 markers = a kill during start-up or store creation.
EXTRACT_KILLS = [(0, (0.5, 3.5)), (1, (0.0, 0.03)), (3, (0.0, 0.03)), (0, (0.0, 4.0))]


@pytest.mark.parametrize("fmt", ["zarr", pytest.param("wds", marks=pytest.mark.slow)])
def test_extract_killed_at_random_points_resumes_to_the_same_store(synth_data, tmp_path, fmt):
    name = "f.zarr" if fmt == "zarr" else "f"
    reference, killed = tmp_path / "reference" / name, tmp_path / "killed" / name
    run_to_end(cli("extract", *EXTRACT_FLAGS, "--data", synth_data, "--out", reference), tmp_path / "reference.log")
    rng = random.Random(f"{SEED}/{fmt}")
    outcomes = []
    for attempt, (needed, delay_range) in enumerate(EXTRACT_KILLS):
        delay = rng.uniform(*delay_range)
        was_killed = run_and_kill(cli("extract", *EXTRACT_FLAGS, "--data", synth_data, "--out", killed),
                                  lambda: markers(killed) >= needed, delay, tmp_path / f"kill{attempt}.log")
        outcomes.append((needed, round(delay, 2), was_killed, markers(killed)))
    print("kills (markers needed, extra delay s, killed, markers after):", outcomes)
    assert sum(killed for _, _, killed, _ in outcomes) >= 3, outcomes
    assert any(0 < done < N_SHARDS for *_, done in outcomes), f"no kill landed mid-store: {outcomes}"
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


# Kill once the log has this many steps, after an extra delay (which may land inside a checkpoint write).
TRAIN_KILLS = [(2, (0.0, 0.05)), (3, (0.0, 1.5))]


@pytest.mark.slow
def test_train_killed_after_a_checkpoint_resumes_to_the_same_losses(synth_data, small_store, tmp_path):
    common = [*TRAIN_FLAGS, "--data", synth_data, "--features", small_store]
    run_to_end(cli("train", *common, "--out", tmp_path / "straight"), tmp_path / "straight.log")
    rng = random.Random(f"{SEED}/train")
    run = tmp_path / "resumed"
    outcomes = []
    for attempt, (steps, delay_range) in enumerate(TRAIN_KILLS):
        resume = ["--resume"] if attempt else []
        delay = rng.uniform(*delay_range)
        was_killed = run_and_kill(cli("train", *common, "--out", run, *resume),
                                  lambda: len(log_iters(run)) >= steps, delay, tmp_path / f"kill{attempt}.log")
        checkpoint = load_checkpoint(run / "last.pt")["iteration"] if (run / "last.pt").exists() else None
        outcomes.append((steps, round(delay, 2), was_killed, checkpoint))
    print("kills (steps logged, extra delay s, killed, checkpoint iteration):", outcomes)
    assert all(killed for _, _, killed, _ in outcomes), outcomes
    run_to_end(cli("train", *common, "--out", run, "--resume"), tmp_path / "final.log")
    assert log_iters(run) == [1, 2, 3, 4], outcomes
    assert losses(run) == losses(tmp_path / "straight"), f"resumed losses differ; kills: {outcomes}"


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
