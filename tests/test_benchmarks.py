"""The benchmarks' shared pieces: the bootstrap interval, the clock and the interleaving (benchmarks/timing.py), the
timed training step (benchmarks/step.py) against the engine's, the pair configs (benchmarks/pairs.py), and result
names and the performance table (benchmarks/results.py, benchmarks/table.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import zarr_pipeline
from benchmarks.pairs import PAIRS, extract_command, extract_config, sized, synthetic_data, train_config
from benchmarks.results import NAME, device_slug, result_name
from benchmarks.step import build_mode, step_benchmark, timed_step
from benchmarks.table import newest_results, performance_table
from benchmarks.timing import Clock, bootstrap_ratio_ci, interleaved_blocks, ratio_of_medians
from pkd_offline.engine import training_step
from stages.extract import extract

ROOT = Path(__file__).resolve().parents[1]


def test_bootstrap_resamples_blocks_with_replacement():
    # Two blocks whose ratios are 1 and 3: resamples of both blocks give 2, of one block twice 1 or 3.
    low, high = bootstrap_ratio_ci([1.0, 3.0], [1.0, 1.0], resamples=4000, seed=0)
    assert (low, high) == (1.0, 3.0)


def test_bootstrap_is_seeded_and_brackets_the_ratio():
    rng = torch.Generator().manual_seed(1)
    denominator = (100 + torch.rand(12, generator=rng) * 10).tolist()
    numerator = [1.3 * value + float(torch.rand(1, generator=rng)) * 8 for value in denominator]
    first = bootstrap_ratio_ci(numerator, denominator, seed=3)
    assert first == bootstrap_ratio_ci(numerator, denominator, seed=3)
    assert first != bootstrap_ratio_ci(numerator, denominator, seed=4)
    assert first[0] < ratio_of_medians(numerator, denominator) < first[1]
    assert 1.25 < first[0] and first[1] < 1.45


def test_bootstrap_of_an_exact_ratio_is_that_ratio():
    assert bootstrap_ratio_ci([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == (2.0, 2.0)


def test_bootstrap_refuses_unpaired_blocks():
    with pytest.raises(ValueError, match="equal-length"):
        bootstrap_ratio_ci([1.0, 2.0], [1.0])


def test_clock_parts_sum_to_the_step():
    clock = Clock(torch.device("cpu"))
    clock.start()
    clock.mark("a")
    sum(range(100_000))
    clock.mark("b")
    parts = clock.parts()
    assert list(parts) == ["a", "b", "step"] and parts["b"] > 0
    assert parts["step"] == pytest.approx(parts["a"] + parts["b"])


def test_interleaved_blocks_rotate_the_order():
    order = []
    steps = {name: (lambda name=name: order.append(name) or {"step": 1.0}) for name in ("x", "y", "z")}
    timed = interleaved_blocks(steps, blocks=3, steps_per_block=2)
    assert order == ["x", "x", "y", "y", "z", "z", "y", "y", "z", "z", "x", "x", "z", "z", "x", "x", "y", "y"]
    assert {name: [len(block) for block in blocks] for name, blocks in timed.items()} == {
        "x": [2, 2, 2], "y": [2, 2, 2], "z": [2, 2, 2]}


def test_result_names_carry_their_provenance():
    facts = {"benchmark": "gpu_check", "pair": "paper", "device": device_slug("NVIDIA H100 80GB HBM3"),
             "codec": "pca", "date": "2026-11-26", "commit": "5673159"}
    assert result_name(facts) == "gpu_check-paper-h100-pca-2026-11-26-5673159.json"
    assert device_slug("NVIDIA H200") == "h200" and device_slug("cpu") == "cpu"
    with pytest.raises(ValueError, match="one word each"):
        result_name({**facts, "pair": "paper-quick"})


def write(folder: Path, benchmark: str, device: str, recorded_at: str, commit: str, ratio: float) -> None:
    facts = {"benchmark": benchmark, "pair": "paper", "device": device, "codec": "pca", "machine": f"{device} box",
             "date": recorded_at[:10], "recorded_at": recorded_at, "commit": commit, "dirty": False}
    result = {"provenance": facts, "step_ratio_offline_over_alone": ratio,
              "step_ratio_offline_over_alone_ci95": [ratio - 0.01, ratio + 0.02]}
    (folder / result_name(facts)).write_text(json.dumps(result))


def test_table_shows_the_newest_result_per_benchmark_pair_and_device(tmp_path):
    write(tmp_path, "gpu_check", "h200", "2026-11-26T10:00:00+00:00", "aaaaaaa", 1.5)
    write(tmp_path, "gpu_check", "h200", "2026-11-27T09:00:00+00:00", "bbbbbbb", 1.2)
    write(tmp_path, "gpu_check", "h100", "2026-11-25T09:00:00+00:00", "ccccccc", 1.4)
    (tmp_path / "gpu_check-h200-2026-11-26-b.json").write_text("{}")  # an unnamed legacy file: not a row
    assert {key: r["provenance"]["commit"] for key, r in newest_results(tmp_path).items()} == {
        ("gpu_check", "paper", "h200"): "bbbbbbb", ("gpu_check", "paper", "h100"): "ccccccc"}
    table = performance_table(tmp_path)
    rows = [line for line in table.splitlines() if line.startswith("| paper")]
    assert rows == ["| paper | h200 | h200 box | pca | 2026-11-27 | bbbbbbb | 1.200 [1.190, 1.220] | - | - | - | - |",
                    "| paper | h100 | h100 box | pca | 2026-11-25 | ccccccc | 1.400 [1.390, 1.420] | - | - | - | - |"]
    run_facts = {**json.loads(next(tmp_path.glob("gpu_check-paper-h100*")).read_text())["provenance"],
                 "benchmark": "run", "device": "cpu", "recorded_at": "2026-11-28T09:00:00+00:00", "date": "2026-11-28"}
    (tmp_path / result_name(run_facts)).write_text(json.dumps({  # the paper pair's run: paper_-prefixed headlines
        "provenance": run_facts, "paper_offline_over_online": 0.7, "paper_offline_over_online_ci95": [0.68, 0.73]}))
    quick_facts = {**run_facts, "pair": "paper_quick"}
    (tmp_path / result_name(quick_facts)).write_text(json.dumps({"provenance": quick_facts,
                                                                  "paper_offline_over_online": 0.8}))
    table = performance_table(tmp_path)
    assert "| paper | cpu | h100 box | pca | 2026-11-28 | ccccccc | - | - | 0.700 [0.680, 0.730] | - |" in table
    assert "| paper_quick | cpu | h100 box | pca | 2026-11-28 | ccccccc | - | - | 0.800 | - |" in table
    command = subprocess.run([sys.executable, "-m", "benchmarks.table", "--results", str(tmp_path)], cwd=ROOT,
                             capture_output=True, text=True, check=True)
    assert command.stdout == table


def test_results_folder_names_fit_the_scheme_or_are_legacy():
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        text = path.read_text().strip()
        try:  # a result file is one JSON document; legacy files end with a JSON line after the run's log
            content = json.loads(text)
        except json.JSONDecodeError:
            content = json.loads(text.splitlines()[-1])
        assert bool(NAME.match(path.name)) == ("provenance" in content), path.name


def test_extract_config_is_the_pair_and_runs_through_the_cli(tmp_path):
    pair = sized(PAIRS["paper"], variant="tiny", short_side=64, max_size=96)
    data = synthetic_data(tmp_path / "data", 3, 96)
    cfg = extract_config(pair, data, tmp_path / "f.zarr", codec="int8", workers=0)
    assert (cfg.teacher, cfg.levels, cfg.layout, cfg.student_levels, cfg.views) == (
        "swin_s", "2,3,4,5", "projected", "3,4,5,6", 1)
    assert extract_config(sized(pair, layout="full"), data, tmp_path / "g.zarr").student_levels is None
    command, record = extract_command(cfg, tmp_path, "f")
    subprocess.run([sys.executable, "-m", "pkd_offline", *command], cwd=ROOT, check=True, capture_output=True)
    figures = json.loads(record.read_text())
    assert figures["samples"] == 3 and figures["out"] == str(tmp_path / "f.zarr")
    assert train_config(pair, data, features=cfg.out).level_map == "index"


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """The paper pair at tiny sizes: data, an int8 projected zarr store (statistics levels and a map level)."""
    work = tmp_path_factory.mktemp("step")
    pair = sized(PAIRS["paper"], variant="tiny", backbone="resnet18", short_side=64, max_size=96, batch_size=2)
    data = synthetic_data(work / "data", 4, 96)
    store = extract(extract_config(pair, data, work / "f.zarr", codec="int8", workers=0))
    wds = extract(extract_config(pair, data, work / "wds", codec="int8", workers=0, store_format="wds"))
    return pair, data, store, wds


@pytest.mark.parametrize("mode", ["alone", "offline", "online"])
def test_timed_step_makes_the_engines_update(tiny_setup, mode):
    pair, data, store, _ = tiny_setup
    cfg = train_config(pair, data, features=store if mode == "offline" else None, online=mode == "online",
                       workers=0, lr=0.01)
    reference, timed = build_mode(cfg, store), build_mode(cfg, store)
    batch = next(reference.batches)
    timed.batches = iter([batch])
    terms = training_step(reference.model, batch, reference.optimizer, device=torch.device("cpu"),
                          distill=reference.distill, size_divisor=32)
    parts = timed_step(timed, Clock(torch.device("cpu")))
    assert timed.losses[-1] == pytest.approx(terms["loss"], rel=1e-6)
    expected = {"alone": [], "offline": ["decode", "pkd_forward", "pkd_backward"],
                "online": ["teacher", "pkd_forward", "pkd_backward"]}[mode]
    host = ["pkd_host"] if mode != "alone" else []
    assert list(parts) == ["loader", "image_decode", "copy", "student_forward", *expected, "backward_and_update",
                           "step", *host]
    assert parts["step"] == pytest.approx(sum(v for k, v in parts.items() if k not in ("step", "pkd_host")))
    if host:  # on the CPU the host runs the path: its time covers the timed parts it spans
        spanned = sum(parts[k] for k in expected)
        assert 0.5 * spanned <= parts["pkd_host"] <= spanned + 5
    for (name, a), b in zip(reference.model.named_parameters(), timed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)


def test_step_benchmark_reports_ratios_with_intervals_and_breakdowns(tiny_setup):
    pair, data, store, wds = tiny_setup
    configs = {"alone": train_config(pair, data, workers=0),
               "offline_zarr": train_config(pair, data, features=store, workers=0),
               "offline_wds": train_config(pair, data, features=wds, workers=0),
               "online": train_config(pair, data, online=True, workers=0)}
    figures = step_benchmark(configs, store, blocks=2, steps_per_block=1, warmup=0)
    for key in ("step_ratio_offline_over_alone", "step_ratio_offline_zarr_over_alone",
                "step_ratio_offline_wds_over_alone", "step_ratio_online_over_alone", "offline_over_online"):
        low, high = figures[f"{key}_ci95"]
        assert 0 < low <= high, key
    worse = max(figures["step_ratio_offline_over_alone_per_format"].values())
    assert figures["step_ratio_offline_over_alone"] == worse
    assert set(figures["step_breakdown_ms"]) == set(configs)
    assert "decode" in figures["step_breakdown_ms"]["offline_wds"] and "teacher" in figures["step_breakdown_ms"]["online"]
    assert figures["peak_gpu_memory_gb"] == dict.fromkeys(configs)
    assert {mode for mode, parts in figures["step_breakdown_ms"].items() if "pkd_host" in parts} == set(configs) - {"alone"}
    assert figures["pkd_path_device_waits"] is None, "the sync debug mode is CUDA's"


def test_zarr_pipeline_reads_the_same_samples_every_way_and_rates_each_against_direct(tiny_setup):
    _, _, store, _ = tiny_setup
    figures = zarr_pipeline.bench(Path(store), rounds=2)
    assert figures["paths"][:2] == ["direct", "zarr"] and figures["samples"] == 4
    for name in figures["paths"][1:]:
        low, high = figures[f"{name}_over_direct_ci95"]
        assert 0 < low <= figures[f"{name}_over_direct"] <= high
    # a path that reads other values is refused before anything is timed
    opened = zarr_pipeline.readers(Path(store))
    wrong = opened["zarr"]
    original = wrong.read
    wrong.read = lambda index: original(index + 1)
    with pytest.raises(SystemExit, match="zarr reads sample 0"):
        zarr_pipeline.same_samples(opened)
    assert not zarr_pipeline.readers(Path(store))["zarr"]._direct, "the zarr path reads through zarr"
