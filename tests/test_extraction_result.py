"""The record of an extraction (pkd_offline/extraction/result.py): its counts, seconds and rates, and --record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pkd_offline.cli import main
from pkd_offline.errors import PkdError
from pkd_offline.extraction.pipeline import EXTRACT_PHASES
from pkd_offline.extraction.result import ExtractionResult, significant
from stages.extract import ExtractConfig, run_extraction
from storage import open_store
from storage.testing import killed_copy


def config(data: Path, out: Path, **overrides) -> ExtractConfig:
    settings = dict(teacher="swin", random_init=True, variant="tiny", data=data, split="train", out=out, views=1,
                    short_side=128, max_size=128, batch_size=4, workers=0, samples_per_shard=4, progress=False)
    return ExtractConfig(**{**settings, **overrides})


def test_the_record_counts_what_the_store_holds_and_times_add_up(synth_data, tmp_path):
    result = run_extraction(config(synth_data, tmp_path / "f.zarr"))
    store = open_store(result.out)
    assert (result.samples, result.images, result.samples_total) == (8, 8, store.manifest.n_samples) == (8, 8, 8)
    assert (result.resumed_samples, result.fit_seconds, result.fit_samples) == (0, 0.0, 0)
    assert list(result.phase_seconds) == list(EXTRACT_PHASES) and result.phase_seconds["fit"] == 0.0
    assert all(seconds >= 0 for seconds in result.phase_seconds.values())
    assert result.phase_seconds["teacher"] > 0 and sum(result.phase_seconds.values()) <= result.seconds
    assert result.samples_per_second == pytest.approx(8 / result.seconds)
    assert result.steady_samples_per_second == pytest.approx(result.samples_per_second)  # no fit: the same
    assert (result.cuda_graphs, result.cuda_graph_captures, result.cuda_graph_capture_seconds) == (False, 0, 0.0)
    # resumed: one of two shards lost; this process writes it only, the record says what it found
    killed = killed_copy(Path(result.out), tmp_path / "killed.zarr", unfinished_shards=(1,))
    resumed = run_extraction(config(synth_data, killed))
    assert (resumed.samples, resumed.images, resumed.resumed_samples, resumed.samples_total) == (4, 4, 4, 8)
    done = run_extraction(config(synth_data, killed))
    assert (done.samples, done.resumed_samples, done.seconds, done.samples_per_second) == (0, 8, 0.0, 0.0)


def test_a_run_inside_the_pca_fit_has_no_steady_rate_and_says_the_fits_seconds_apart(synth_data, tmp_path):
    result = run_extraction(config(synth_data, tmp_path / "p.zarr", codec="pca"))
    assert result.samples == result.fit_samples == 8  # fewer than FIT_SAMPLES: every sample's maps came from the fit
    assert 0 < result.fit_seconds == result.phase_seconds["fit"] <= result.seconds
    assert sum(result.phase_seconds.values()) <= result.seconds
    assert result.steady_samples_per_second is None
    assert "every sample fell within it" in result.summary()[0]


def test_the_summary_prints_rates_with_significant_digits():
    result = ExtractionResult.of(out="f.zarr", samples=8, images=8, samples_total=8, resumed_samples=0,
                                 seconds=175.418, fit_seconds=172.0, fit_samples=8,
                                 phase_seconds=dict.fromkeys(EXTRACT_PHASES, 1.0))
    line, phases = result.summary()
    assert line.startswith("extract: 8 samples in 175.418 s from the first batch")  # what benchmarks parse
    assert "(0.0456 samples/s in this process" in line and "took 172.000 s" in line
    assert phases == "extract phases: " + ", ".join(f"{name} 1.000 s" for name in EXTRACT_PHASES)
    assert [significant(x) for x in (0.045606, 12.345, 1234.4, 0.0)] == ["0.0456", "12.3", "1234", "0"]


def test_the_record_flag_writes_the_record_as_json(synth_data, tmp_path):
    assert main(["extract", "--teacher", "swin", "--random-init", "--variant", "tiny", "--data", str(synth_data),
                 "--out", str(tmp_path / "f.zarr"), "--short-side", "128", "--max-size", "128", "--workers", "0",
                 "--samples-per-shard", "4", "--no-progress", "--record", str(tmp_path / "record.json")]) == 0
    record = json.loads((tmp_path / "record.json").read_text())
    assert set(record) == {"out", "samples", "images", "samples_total", "resumed_samples", "seconds", "fit_seconds",
                           "fit_samples", "phase_seconds", "samples_per_second", "steady_samples_per_second", "rank",
                           "world_size", "cuda_graphs", "cuda_graph_captures", "cuda_graph_capture_seconds",
                           "cuda_graph_failure"}
    assert (record["out"], record["samples"], record["samples_total"]) == (str(tmp_path / "f.zarr"), 8, 8)
    assert list(record["phase_seconds"]) == list(EXTRACT_PHASES)


def test_a_record_that_cannot_be_written_is_one_line_and_the_record_folder_is_made(tmp_path):
    result = ExtractionResult.of(out="f.zarr", samples=8, images=8, samples_total=8, resumed_samples=0, seconds=1.0,
                                 fit_seconds=0.0, fit_samples=0, phase_seconds=dict.fromkeys(EXTRACT_PHASES, 0.1))
    result.write(tmp_path / "new" / "record.json")
    assert json.loads((tmp_path / "new" / "record.json").read_text())["samples"] == 8
    (tmp_path / "a_file").write_text("")
    with pytest.raises(PkdError, match=r"cannot write the extraction record to .*a_file/record.json.*f.zarr is "
                                       r"complete: pass another --record path"):
        result.write(tmp_path / "a_file" / "record.json")
