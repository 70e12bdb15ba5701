"""The study driver's bookkeeping (study.run): step times kept as steps finish, and the report of a study stopped
early (``--report-only``), without training anything."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from study.ledger import Ledger
from study.run import finished_seeds, job_order, main, recorded_step_seconds, run_command


def _finish(runs, arm: str, seed: int, mAP: float) -> None:
    """A run's eval.json as `pkd-offline eval` writes it (only the field the study reads matters here)."""
    out = runs / f"{arm}-seed{seed}"
    out.mkdir(parents=True)
    (out / "eval.json").write_text(json.dumps({"mAP": mAP, "AP50": 0.9}))


def _ready_teacher_and_data(tmp_path: Path, teacher_runs: Path, mAP: float) -> None:
    """The files by which the driver sees the data made and the teacher trained and evaluated."""
    (tmp_path / "data" / "annotations").mkdir(parents=True)
    (tmp_path / "data" / "annotations" / "instances_val.json").write_text("{}")
    (teacher_runs / "teacher").mkdir(parents=True)
    (teacher_runs / "teacher" / "model.pt").write_bytes(b"")
    (teacher_runs / "teacher" / "eval.json").write_text(json.dumps({"mAP": mAP}))


def _record_commands(monkeypatch, commands: list, mAP_of) -> None:
    """Replace study.run's run_command by one that records each command and writes the files its real command
    would (what the driver checks): a train's model.pt, an eval's eval.json with ``mAP_of(out)``."""
    import study.run as study_run

    def record(args, log):
        commands.append(args[3:])
        out = Path(args[args.index("--out") + 1])
        out.parent.mkdir(parents=True, exist_ok=True)
        if args[3] == "eval":
            out.write_text(json.dumps({"mAP": mAP_of(out)}))
        else:
            out.mkdir(exist_ok=True)
            (out / "model.pt").write_bytes(b"")
        return 1.0
    monkeypatch.setattr(study_run, "run_command", record)


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
    ledger = Ledger(tmp_path / "ledger.json")
    assert ledger.absorb(tmp_path) == ["baseline-seed0", "baseline-seed2"]
    done = finished_seeds(ledger, {"baseline": [0, 1, 2], "online_index": [0, 1, 2]})
    assert done == {"baseline": [0, 2]}


def test_the_ledger_keeps_finished_runs_across_sessions_and_the_report_needs_no_run_folders(tmp_path):
    """A run recorded in the ledger (its final eval and the evals during training) is reported after its folder is
    gone, and a study that resumes skips it; the per-seed evals become the convergence points."""
    runs = tmp_path / "runs"
    _finish(runs, "baseline", 0, 0.60)
    (runs / "baseline-seed0" / "eval.jsonl").write_text("".join(
        json.dumps({"iter": it, "mAP": m}) + "\n" for it, m in [(1000, 0.5), (500, 0.3)]))
    ledger = Ledger(tmp_path / "study-runs.json")
    ledger.absorb(runs)
    for seed, value in [(1, 0.62)]:
        _finish(runs, "baseline", seed, value)
        ledger.record_run("baseline", seed, runs / f"baseline-seed{seed}")
    again = Ledger(tmp_path / "study-runs.json")  # a later session: the file alone
    assert again.seeds("baseline") == [0, 1] and again.map_of("baseline", 1) == 0.62
    assert [row["iter"] for row in again.runs["baseline-seed0"]["evals"]] == [500, 1000]
    assert again.absorb(runs) == []  # nothing new
    import shutil
    shutil.rmtree(runs)
    params = {"study": {"seeds": [0, 1], "arms": ["baseline"], "data": str(tmp_path / "data"), "runs": str(runs),
                        "store": str(tmp_path / "store.zarr")}, "baseline": {"iters": 10}, "eval": {"split": "val"}}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    out = tmp_path / "study.json"
    assert main(["--params", str(params_file), "--report-only", "--out", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    report = json.loads(out.read_text())
    assert report["arms"]["baseline"]["mAP"] == [0.60, 0.62] and report["complete"] is True
    assert report["convergence"]["baseline"] == {"iters": [500, 1000], "seeds": [0], "mAP": [[0.3], [0.5]]}


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
    _finish(runs, "baseline", 4, 0.62)  # an extra seed, run to pin a spread down: reported too
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
    assert report["seeds_per_arm"] == {"baseline": [0, 1, 2, 4], "offline_index": [0, 1]}
    assert report["arms"]["baseline"]["mAP"] == [0.60, 0.61, 0.59, 0.62]
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


def test_codec_arms_report_their_bits_alias_the_study_store_and_time_apart(tmp_path):
    """--report-only over a study with codec arms: every finished arm (main and codec) is reported, the alias names
    the study store's own arm again, the codec arms' (and a side run's) steps are timed apart from the main study,
    and each codec point's bits per value is measured on its (real) store."""
    from storage.testing import tiny_manifest, tiny_samples, write_store

    runs = tmp_path / "runs"
    stores = {}
    for codec in ("fp16", "int4"):
        stores[codec] = str(tmp_path / f"{codec}.zarr")
        manifest = tiny_manifest(codec=codec, channels=32, max_image_hw=(128, 160))
        write_store(stores[codec], manifest, tiny_samples(manifest))
    params = {"study": {"seeds": [0, 1], "arms": ["baseline", "offline_index"], "codec_arms": ["offline_index_int4"],
                        "aliases": {"offline_index_fp16": "offline_index"}, "diagnostics": {"baseline_long": [0]},
                        "data": str(tmp_path / "data"), "runs": str(runs),
                        "stores": {stores["fp16"]: "extract", stores["int4"]: "extract_int4"}},
              "extract": {"codec": "fp16"}, "extract_int4": {"codec": "int4"},
              "baseline": {"iters": 10}, "offline_index": {"features": stores["fp16"]},
              "offline_index_int4": {"features": stores["int4"]}, "eval": {"split": "val"}}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    for arm, values in {"baseline": [0.60, 0.61], "offline_index": [0.64, 0.63], "offline_index_int4": [0.62, 0.63]}.items():
        for seed, value in enumerate(values):
            _finish(runs, arm, seed, value)
    (runs / "logs").mkdir()
    (runs / "logs" / "steps.jsonl").write_text("".join(json.dumps(row) + "\n" for row in [
        {"step": "baseline-seed0", "seconds": 10.0, "end": 1000.0},
        {"step": "offline_index-seed1-eval", "seconds": 5.0, "end": 1200.0},
        {"step": "extract_int4", "seconds": 20.0, "end": 5020.0},
        {"step": "baseline-seed7-eval", "seconds": 3.0, "end": 9000.0},  # an extra seed: timed apart
        {"step": "baseline_long-seed0", "seconds": 50.0, "end": 9500.0},  # a side run: timed apart
        {"step": "offline_index_int4-seed1", "seconds": 100.0, "end": 5500.0}]))
    out = tmp_path / "study.json"
    assert main(["--params", str(params_file), "--report-only", "--out", str(out), "--plot",
                 str(tmp_path / "study.png")]) == 0
    report = json.loads(out.read_text())
    assert set(report["arms"]) == {"baseline", "offline_index", "offline_index_int4", "offline_index_fp16"}
    assert report["arms"]["offline_index_fp16"] == report["arms"]["offline_index"]
    assert report["wall_seconds"] == 1200.0 - (1000.0 - 10.0)  # the main study only
    assert report["codec_arms_wall_seconds"] == 5500.0 - (5020.0 - 20.0)
    assert report["extra_seeds_wall_seconds"] == 3.0
    assert report["diagnostics_wall_seconds"] == 50.0
    points = report["codec_points"]
    assert set(points) == {"offline_index_int4", "offline_index_fp16"}
    assert points["offline_index_fp16"]["codec"] == "fp16" and points["offline_index_int4"]["codec"] == "int4"
    fp16, int4 = (points[f"offline_index_{codec}"]["bits_per_value"] for codec in ("fp16", "int4"))
    assert 12 < fp16 < 24  # 16 bits a value; a 4-sample store's shard overheads and padding count too
    assert int4 < fp16 / 2, (fp16, int4)
    assert (tmp_path / "study-bits.png").stat().st_size > 0


def test_iters_runs_every_student_at_that_length_beside_the_study_and_keeps_its_teacher(tmp_path, monkeypatch):
    """--iters N: each student's train command gets --iters N and lands in RUNS-Nit; the teacher (trained, evaluated)
    and the store are the study's own, not made again; the report says the schedule. The commands are recorded, not
    run (each writes the files its real command would: what the driver checks)."""
    runs = tmp_path / "runs"
    store = tmp_path / "store.zarr"
    params = {"study": {"seeds": [0], "arms": ["baseline", "offline_index"], "data": str(tmp_path / "data"),
                        "runs": str(runs), "store": str(store)},
              "baseline": {"iters": 1000}, "offline_index": {"iters": 1000, "features": str(store)},
              "eval": {"split": "val"}}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    _ready_teacher_and_data(tmp_path, runs, 0.8)
    store.mkdir()
    (store / "manifest.json").write_text("{}")
    commands = []
    _record_commands(monkeypatch, commands, lambda out: 0.6 if "baseline" in str(out) else 0.65)
    out = tmp_path / "study-750it.json"
    assert main(["--params", str(params_file), "--iters", "750", "--out", str(out), "--plot",
                 str(tmp_path / "p.png")]) == 0
    trains = [c for c in commands if c[0] == "train"]
    assert len(trains) == 2 and len(commands) == 4  # no teacher, no extraction: the study's own are kept
    for command in trains:
        assert command[command.index("--iters") + 1] == "750"
        assert Path(command[command.index("--out") + 1]).parent == tmp_path / "runs-750it"
    report = json.loads(out.read_text())
    assert report["iters"] == 750 and report["settings"]["baseline"]["iters"] == 750
    assert report["arms"]["offline_index"]["mAP"] == [0.65] and report["teacher"]["mAP"] == 0.8


def test_a_study_with_teacher_runs_uses_that_teacher_and_trains_its_students_in_its_own_runs(tmp_path, monkeypatch):
    """study.teacher_runs: two settings share one teacher (trained and evaluated in the other study's runs), so
    this study trains no teacher and reports that one's mAP; its students land in its own runs. Commands are
    recorded, not run."""
    shared, runs, store = tmp_path / "runs-a", tmp_path / "runs-b", tmp_path / "store.zarr"
    params = {"study": {"seeds": [0], "arms": ["baseline"], "data": str(tmp_path / "data"), "runs": str(runs),
                        "teacher_runs": str(shared), "store": str(store)},
              "baseline": {"iters": 10}, "eval": {"split": "val"}}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    _ready_teacher_and_data(tmp_path, shared, 0.77)
    commands = []
    _record_commands(monkeypatch, commands, lambda out: 0.6)
    out = tmp_path / "study.json"
    assert main(["--params", str(params_file), "--out", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    assert [c[0] for c in commands] == ["train", "eval"]  # the student only: the shared teacher is not trained again
    assert Path(commands[0][commands[0].index("--out") + 1]) == runs / "baseline-seed0"
    assert json.loads(out.read_text())["teacher"]["mAP"] == 0.77
