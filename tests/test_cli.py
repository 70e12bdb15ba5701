"""The command line as users run it: one clear line and a non-zero exit for bad input, never a traceback."""

import json
import shutil
import subprocess
import sys

import pytest


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pkd_offline", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pkd-offline: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("data", "extract", "train", "eval", "inspect", "verify"):
        assert command in result.stdout


def test_missing_data_directory(tmp_path):
    result = run_cli("train", "--student", "retinanet", "--variant", "tiny", "--data", str(tmp_path / "nowhere"),
                     "--out", str(tmp_path / "run"), "--iters", "1")
    assert_user_error(result, "annotation file", "not found")


def test_annotation_file_that_is_not_coco(synth_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    (data / "annotations" / "instances_train.json").write_text(json.dumps({"hello": 1}))
    result = run_cli("train", "--student", "retinanet", "--variant", "tiny", "--data", str(data), "--out",
                     str(tmp_path / "run"), "--iters", "1")
    assert_user_error(result, "not a COCO annotation file")


def test_unknown_model_lists_known_ones(synth_data, tmp_path):
    result = run_cli("train", "--student", "yolo", "--data", str(synth_data), "--out", str(tmp_path / "run"))
    assert_user_error(result, "unknown model 'yolo'", "retinanet")


def test_teacher_without_weights_names_checkpoint_flag(synth_data, tmp_path):
    result = run_cli("extract", "--teacher", "swin", "--variant", "tiny", "--data", str(synth_data),
                     "--out", str(tmp_path / "f.zarr"))
    assert_user_error(result, "--checkpoint")


@pytest.mark.parametrize("workers", ["0", "1"])
def test_corrupt_jpeg_in_training_is_one_line(synth_data, tmp_path, workers):
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    for image in sorted((data / "train").glob("*.jpg")):
        image.write_bytes(image.read_bytes()[:100])
    result = run_cli("train", "--student", "retinanet", "--backbone", "resnet18", "--variant", "tiny", "--data",
                     str(data), "--out", str(tmp_path / "run"), "--iters", "1", "--workers", workers,
                     "--short-side", "128", "--max-size", "128", "--no-progress")
    assert_user_error(result, "is corrupt", ".jpg")


def test_missing_checkpoint_and_missing_store(synth_data, tmp_path):
    assert_user_error(run_cli("eval", "--checkpoint", str(tmp_path / "model.pt"), "--data", str(synth_data)),
                      "checkpoint", "not found")
    assert_user_error(run_cli("inspect", str(tmp_path / "features.zarr")), "no feature store")


def test_synth_then_inspect_json(tmp_path):
    assert run_cli("data", "synth", "--out", str(tmp_path / "d"), "--train", "2", "--val", "1", "--image-size",
                   "64").returncode == 0
    result = run_cli("extract", "--teacher", "swin", "--random-init", "--variant", "tiny", "--data",
                     str(tmp_path / "d"), "--out", str(tmp_path / "f.zarr"), "--short-side", "64", "--max-size",
                     "64", "--workers", "0", "--no-progress")
    assert result.returncode == 0, result.stderr
    summary = json.loads(run_cli("inspect", str(tmp_path / "f.zarr"), "--json").stdout)
    assert summary["samples"] == 2 and len(summary["digest"]) == 64
