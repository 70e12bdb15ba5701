"""The GPU check runs (as ``--device cpu --quick``) and its JSON line is whole; and the CUDA-path
causes it found, tested on CPU: verify replays extract's precision, torchrun with one process joins
the process group (the nccl path on a GPU)."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import pkd_offline.precision
from benchmarks.gpu_check import loss_tolerance
from benchmarks.pairs import PAIRS
from benchmarks.results import result_name
from pkd_offline.distributed import finish, init_ranks
from pkd_offline.extraction.pipeline import EXTRACT_PHASES
from stages.extract import ExtractConfig, extract
from stages.synth import SynthConfig, synth
from stages.verify import VerifyConfig, verify
from storage import open_store

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = ("extract_ratio_over_forward", "extract_long_ratio_over_forward", "step_ratio_offline_over_alone",
            "step_ratio_online_over_alone", "read_rate_over_consumption", "offline_online_loss_rel_diff")
MODES = ("alone", "offline_zarr", "offline_wds", "online")


@pytest.mark.slow
def test_quick_cpu_check_ends_with_one_whole_json_line(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--quick",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    figures = json.loads(last)
    assert figures["errors"] == {}, figures["errors"]
    assert figures["device"] == "cpu"
    for key in HEADLINE:
        assert isinstance(figures[key], float) and figures[key] >= 0, key
    # Timing ratios are only checked to be measured (positive, finite): their values on a shared CPU
    # are noise, and speed is the benchmarks' business, not a test's.
    for key in ("extract_ratio_over_forward", "extract_long_ratio_over_forward", "step_ratio_offline_over_alone",
                "step_ratio_online_over_alone", "read_rate_over_consumption"):
        assert 0 < figures[key] < float("inf"), key
    assert figures["offline_online_loss_rel_diff"] < figures["loss_check"]["tolerance"] == loss_tolerance(PAIRS["paper"].codec)
    assert figures["step_ratio_offline_over_alone"] == max(figures["step_ratio_offline_over_alone_per_format"].values())
    assert set(figures["step_ratio_offline_over_alone_per_format"]) == {"zarr", "wds"}
    assert set(figures["peak_gpu_memory_gb"]) == set(MODES)
    assert all(value is None for value in figures["peak_gpu_memory_gb"].values()), "no GPU memory on a CPU run"
    assert set(figures["step_seconds"]) == set(MODES) and all(v > 0 for v in figures["step_seconds"].values())
    # each step ratio beside its 95% interval over blocks; the headline is the worse store format's
    for key in ("step_ratio_offline_over_alone", "step_ratio_offline_zarr_over_alone",
                "step_ratio_offline_wds_over_alone", "step_ratio_online_over_alone", "offline_over_online"):
        low, high = figures[f"{key}_ci95"]
        assert 0 < low <= high, key
    worse = figures["offline_worse_format"]
    assert figures["step_ratio_offline_over_alone_ci95"] == figures[f"step_ratio_offline_{worse}_over_alone_ci95"]
    assert set(figures["step_breakdown_ms"]) == set(MODES)
    assert {"loader", "copy", "decode", "pkd_forward", "pkd_backward"} <= set(figures["step_breakdown_ms"]["offline_zarr"])
    assert "teacher" in figures["step_breakdown_ms"]["online"]
    assert (tmp_path / result_name(figures["provenance"])).read_text().strip() == last
    assert set(figures["read_samples_per_s"]) == {"images_only", "zarr", "wds"}
    assert set(figures["extract_ratio_over_forward_per_format"]) == {"zarr", "wds"}
    assert figures["extract_ratio_over_forward"] == min(figures["extract_ratio_over_forward_per_format"].values())
    assert figures["verify"]["ok"] and figures["extract"]["codec"] == figures["codec"] == PAIRS["paper"].codec
    assert figures["torchrun"]["backend"] == "gloo" and len(figures["torchrun"]["train_losses"]) == 2
    assert figures["torchrun"]["store_digest_equal_to_single_process"]
    assert (tmp_path / "gpu_check.json").read_text().strip() == last
    assert "section torchrun done" in (tmp_path / "gpu_check.log").read_text()
    # the GPU-only tests ran (and, without a GPU, skipped themselves); the check's forward has no graphs off CUDA
    assert figures["cuda_tests"]["exit_code"] == 0 and "skipped" in figures["cuda_tests"]["summary"]
    assert "forward_graphed" not in figures and figures["extract"]["img_per_s_steady_without_graphs"] is None
    # the long extraction: the training set repeated to at least long_samples, one run off CUDA (no eager twin)
    long = figures["extract_long"]
    assert set(long) == {"long"} and long["long"]["samples"] >= figures["sizes"]["long_samples"]
    assert long["long"]["samples"] == figures["sizes"]["images"] * long["long"]["copies_of_the_set"]
    assert 0 <= long["long"]["warmup_share"] < 1 and set(long["long"]["phase_seconds"]) == set(EXTRACT_PHASES)


@pytest.mark.slow
def test_quick_check_of_a_projected_int8_store_gives_the_online_loss(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--quick",
                             "--only", "synth,extract,loss,batch", "--layout", "projected", "--codec", "int8",
                             "--out", str(tmp_path), "--work", str(tmp_path / "work")],
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["errors"] == {} and (figures["layout"], figures["codec_flag"]) == ("projected", "int8")
    for store in ("f.zarr", "wds"):  # the flags reached extract
        manifest = open_store(str(tmp_path / "work" / store)).manifest
        assert manifest.codec == "int8" and manifest.layout["pairs"] == [[8, 4], [16, 8], [32, 16], [64, 32]]
    assert figures["offline_online_loss_rel_diff"] < figures["loss_check"]["tolerance"]
    assert figures["loss_check"]["loss"]["offline_zarr"] > 1.0  # a real loss, not an empty one
    # extract's record (--record): where its main loop waited (what isolates a slow extraction).
    phases = figures["extract"]["phase_seconds"]
    for name in ("zarr", "wds"):
        assert set(phases[name]) == set(EXTRACT_PHASES)
        assert phases[name]["teacher"] > 0 and sum(phases[name].values()) <= figures["extract"]["seconds"][name]
    # the batch section: each piece of one batch's path timed, on the store's own projected strides
    path = figures["batch_path"]
    assert path["codec"] == "int8" and path["projected"] == [4, 8, 16] and sum(path["images_per_batch"]) == 8
    assert all(path["ms_per_batch"][piece] > 0 for piece in ("forward", "teacher_levels", "encode_and_finish"))
    assert path["launch_waits_for_device"] is None  # sync debug mode is CUDA's


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return synth(SynthConfig(out=tmp_path_factory.mktemp("data"), train=3, val=1, image_size=96, seed=0))


def test_verify_recomputes_in_the_precision_extract_used(tiny_data, tmp_path, monkeypatch):
    """On CUDA extract runs the teacher in bf16; verify must too (bf16 vs float32 maps differ at
    r ~ 0.9999). CPU autocast stands in for the CUDA one: the fp32 codec's threshold is 0.99999."""
    monkeypatch.setattr(pkd_offline.precision, "AUTOCAST_DEVICE_TYPES", ("cuda", "cpu"))
    store = extract(ExtractConfig(teacher="swin", random_init=True, variant="tiny", data=tiny_data, out=tmp_path / "f.zarr",
                                  codec="fp32", short_side=96, max_size=96, workers=0, progress=False))
    report = verify(VerifyConfig(store=str(store), data=tiny_data, samples=3, progress=False))
    assert report["ok"], report["text"]
    assert min(level["min_r"] for level in report["levels"].values()) > 0.999999


def test_torchrun_with_one_process_joins_the_process_group(monkeypatch):
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        port = handle.getsockname()[1]
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    ranks = init_ranks(torch.device("cpu"))
    try:
        assert ranks.distributed and ranks.is_main and ranks.world_size == 1
        assert dist.is_initialized() and dist.get_backend() == "gloo"
    finally:
        finish(ranks)
    assert not dist.is_initialized()


def test_without_torchrun_no_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ranks = init_ranks(torch.device("cpu"))
    assert not ranks.distributed and not dist.is_initialized()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
