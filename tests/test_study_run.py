"""The study driver's bookkeeping (study.run): step times kept as steps finish, and the report of a study stopped
early (``--report-only``), without training anything."""

from __future__ import annotations

import json
import sys

import yaml

from study.run import finished_seeds, job_order, main, recorded_step_seconds, run_command


def _finish(runs, arm: str, seed: int, mAP: float) -> None:
    """A run's eval.json as `pkd-offline eval` writes it (only the field the study reads matters here)."""
    out = runs / f"{arm}-seed{seed}"
    out.mkdir(parents=True)
    (out / "eval.json").write_text(json.dumps({"mAP": mAP, "AP50": 0.9}))


def test_run_command_appends_each_finished_steps_seconds_beside_its_log(tmp_path):
    logs = tmp_path / "logs"
    run_command([sys.executable, "-c", "print('one')"], logs / "baseline-seed0.log")
    run_command([sys.executable, "-c", "print('two')"], logs / "baseline-seed0-eval.log")
    run_command([sys.executable, "-c", "print('again')"], logs / "baseline-seed0.log")
    lines = (logs / "steps.jsonl").read_text().splitlines()
    assert all(json.loads(line)["end"] > 1.7e9 for line in lines)  # Unix seconds of the step's end
    assert [json.loads(line)["step"] for line in lines] == ["baseline-seed0", "baseline-seed0-eval", "baseline-seed0"]
    seconds = recorded_step_seconds(logs)
    assert set(seconds) == {"baseline-seed0", "baseline-seed0-eval"}
    assert seconds["baseline-seed0"] == json.loads(lines[2])["seconds"] > 0  # the last run of a step wins
    assert recorded_step_seconds(tmp_path / "nowhere") == {}


def test_finished_seeds_keeps_only_runs_with_an_eval_and_drops_arms_with_none(tmp_path):
    _finish(tmp_path, "baseline", 0, 0.6)
    _finish(tmp_path, "baseline", 2, 0.6)
    (tmp_path / "baseline-seed1").mkdir()  # trained, not evaluated
    (tmp_path / "baseline-seed1" / "model.pt").write_bytes(b"")
    done = finished_seeds(tmp_path, {"baseline": [0, 1, 2], "online_index": [0, 1, 2]})
    assert done == {"baseline": [0, 2]}


def test_report_only_writes_the_finished_runs_and_says_the_study_is_incomplete(tmp_path):
    runs = tmp_path / "runs"
    params = {"study": {"seeds": [0, 1, 2], "arms": ["baseline", "offline_index", "online_index"],
                        "compare": [["offline_index", "baseline"]],
                        "data": str(tmp_path / "data"), "runs": str(runs), "store": str(tmp_path / "store.zarr")},
              "baseline": {"iters": 10}, "offline_index": {"iters": 10, "features": "store.zarr"},
              "online_index": {"iters": 10, "teacher": "resnet50"}, "eval": {"split": "val"}}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    for seed, value in enumerate([0.60, 0.61, 0.59]):
        _finish(runs, "baseline", seed, value)
    for seed, value in enumerate([0.700, 0.702]):
        _finish(runs, "offline_index", seed, value)
    (runs / "teacher").mkdir()
    (runs / "teacher" / "eval.json").write_text(json.dumps({"mAP": 0.8}))
    (runs / "logs").mkdir()
    (runs / "logs" / "steps.jsonl").write_text("".join(json.dumps(row) + "\n" for row in [
        {"step": "baseline-seed0", "seconds": 12.5, "end": 1000.0}, {"step": "teacher", "seconds": 30.0},
        {"step": "offline_index-seed0", "seconds": 50.0, "end": 1100.0}]))
    out, plot = tmp_path / "study.json", tmp_path / "study.png"
    assert main(["--params", str(params_file), "--report-only", "--out", str(out), "--plot", str(plot)]) == 0
    report = json.loads(out.read_text())
    assert report["complete"] is False
    assert report["seeds_per_arm"] == {"baseline": [0, 1, 2], "offline_index": [0, 1]}
    assert report["arms"]["offline_index"]["mAP"] == [0.700, 0.702] and "online_index" not in report["arms"]
    assert report["teacher"]["mAP"] == 0.8
    # The span from the first recorded start to the last end; lines without "end" are left out of it.
    assert report["wall_seconds"] == 1100.0 - (1000.0 - 12.5)
    assert report["step_seconds"] == {"baseline-seed0": 12.5, "teacher": 30.0, "offline_index-seed0": 50.0}
    assert report["step_seconds_sum"] == 92.5
    assert report["comparisons"]["offline_index vs baseline"]["significant"] is True
    assert plot.stat().st_size > 0
    assert not (tmp_path / "data").exists()  # report-only runs nothing, not even the data step


def test_job_order_runs_undistilled_arms_first_then_the_first_arms_then_seed_major():
    arms = ["baseline", "offline_index", "online_index", "offline_stride"]
    distilled = ["offline_index", "online_index", "offline_stride", "teacher_swin"]
    plain = job_order(arms, [0, 1], {}, distilled, [])
    assert plain == [("baseline", 0), ("baseline", 1), ("offline_index", 0), ("online_index", 0),
                     ("offline_stride", 0), ("offline_index", 1), ("online_index", 1), ("offline_stride", 1)]
    ahead = job_order(arms, [0, 1], {"teacher_swin": [0]}, distilled, ["offline_index"])
    assert ahead == [("baseline", 0), ("baseline", 1), ("offline_index", 0), ("offline_index", 1),
                     ("online_index", 0), ("offline_stride", 0), ("online_index", 1), ("offline_stride", 1),
                     ("teacher_swin", 0)]
