"""Run the accuracy study with one command and write ``metrics/study.json`` and ``plots/study.png``.

    python -m study.run                                  # everything in study/params.yaml, on the CPU
    python -m study.run --device cuda --jobs 6           # on a GPU, six student runs at a time
    python -m study.run --arms baseline offline_index --seeds 0 1   # a subset (the JSON says what ran)
    OMP_NUM_THREADS=1 python -m study.run                # on a CPU shared with other jobs: one torch thread
                                                         # a run (two threads under load: 3-4x slower a step here)

Steps, each skipped when its output already exists (so a stopped study resumes; ``--fresh`` redoes all):
synthetic data -> teacher (trained once) -> teacher eval -> feature store (extracted once) -> every
(arm, seed) student run and its eval -> aggregation (``study.aggregate``) -> plot (``study.plot``).
Every step is a ``pkd-offline`` command (``python -m pkd_offline``) over ``study/params.yaml``: each arm
is a ``train`` section of that file, so any one run can be repeated by hand with the printed command.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from study.aggregate import study_report
from study.plot import plot_study

CLI = [sys.executable, "-m", "pkd_offline"]


def run_command(args: list[str], log: Path) -> float:
    """Run one CLI command, its output to ``log``; returns wall seconds; raises SystemExit naming the log on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("+ " + " ".join(args[2:]), flush=True)
    tick = time.perf_counter()
    with open(log, "w") as handle:
        code = subprocess.call(args, stdout=handle, stderr=subprocess.STDOUT)
    if code != 0:
        tail = log.read_text().splitlines()[-3:]
        raise SystemExit(f"study: step failed (exit {code}), see {log}: {' | '.join(tail)}")
    return time.perf_counter() - tick


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the accuracy study (see study/params.yaml)")
    parser.add_argument("--params", type=Path, default=Path("study/params.yaml"))
    parser.add_argument("--arms", nargs="+", help="arms to run (default: the params file's study.arms)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the params file's study.seeds)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--jobs", type=int, default=1, help="student runs at a time (1 on a 2-core CPU)")
    parser.add_argument("--out", type=Path, default=Path("metrics/study.json"))
    parser.add_argument("--plot", type=Path, default=Path("plots/study.png"))
    parser.add_argument("--fresh", action="store_true", help="delete the study's data, runs and store first")
    parser.add_argument("--diagnostics", action="store_true",
                        help="also run study.diagnostics (arm: seeds), reported apart from the arms")
    args = parser.parse_args(argv)
    params = yaml.safe_load(args.params.read_text())
    study = params["study"]
    arms, seeds = args.arms or study["arms"], args.seeds or study["seeds"]
    diagnostics = study.get("diagnostics", {}) if args.diagnostics else {}
    unknown = [arm for arm in [*arms, *diagnostics] if not isinstance(params.get(arm), dict)]
    if unknown:
        parser.error(f"no train section for arm(s) {', '.join(unknown)} in {args.params}")
    data, runs, store = Path(study["data"]), Path(study["runs"]), study["store"]
    if args.fresh:
        for path in (data, runs, Path(store)):
            shutil.rmtree(path, ignore_errors=True)
    common = ["--params", str(args.params), "--no-progress"]
    device = ["--device", args.device]
    seconds: dict[str, float] = {}
    start = time.perf_counter()

    if not (data / "annotations" / f"instances_{params['eval']['split']}.json").exists():
        seconds["data"] = run_command(CLI + ["data", "synth", "--params", str(args.params), "--out", str(data)],
                                      runs / "logs" / "data.log")
    teacher = runs / "teacher" / "model.pt"
    teacher_eval = runs / "teacher" / "eval.json"
    needs_store = any(params[arm].get("features") for arm in [*arms, *diagnostics])

    def teacher_chain() -> None:
        """Train and evaluate the teacher once, then extract its features once."""
        if not teacher.exists():
            seconds["teacher"] = run_command(CLI + ["train", *common, "--section", "teacher", "--out", str(teacher.parent),
                                                    *device], runs / "logs" / "teacher.log")
        if not teacher_eval.exists():
            seconds["teacher_eval"] = run_command(CLI + ["eval", *common, "--section", "eval", "--checkpoint", str(teacher),
                                                         "--out", str(teacher_eval), *device],
                                                  runs / "logs" / "teacher_eval.log")
        if needs_store and not Path(store, "manifest.json").exists():
            seconds["extract"] = run_command(CLI + ["extract", *common, "--section", "extract", "--out", store,
                                                    "--overwrite", *device], runs / "logs" / "extract.log")

    def one_run(arm: str, seed: int, ready=None) -> None:
        if ready is not None:
            ready.result()  # the teacher and store this arm distils from; re-raises the chain's failure
        out = runs / f"{arm}-seed{seed}"
        if not (out / "model.pt").exists():
            seconds[f"{arm}-seed{seed}"] = run_command(
                CLI + ["train", *common, "--section", arm, "--seed", str(seed), "--out", str(out), *device],
                runs / "logs" / f"{arm}-seed{seed}.log")
        if not (out / "eval.json").exists():
            seconds[f"{arm}-seed{seed}-eval"] = run_command(
                CLI + ["eval", *common, "--section", "eval", "--checkpoint", str(out / "model.pt"),
                       "--out", str(out / "eval.json"), *device], runs / "logs" / f"{arm}-seed{seed}-eval.log")

    # Runs start in submission order: the teacher chain first, then every run that needs no teacher (they
    # overlap the chain when --jobs > 1), then the distilled runs, seed-major (a study stopped early still
    # covers every arm). With --jobs 1 nothing waits on a future that has no worker.
    distilled = [arm for arm in [*arms, *diagnostics] if params[arm].get("features") or params[arm].get("teacher")]
    jobs = [(arm, seed) for seed in seeds for arm in arms] + [(a, s) for a, a_seeds in diagnostics.items() for s in a_seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        chain = pool.submit(teacher_chain)
        runs_done = [pool.submit(one_run, arm, seed, chain if arm in distilled else None)
                     for arm, seed in sorted(jobs, key=lambda job: job[0] in distilled)]
        for future in [chain, *runs_done]:
            future.result()

    per_arm = {arm: [json.loads((runs / f"{arm}-seed{seed}" / "eval.json").read_text())["mAP"] for seed in seeds]
               for arm in arms}
    report = study_report(per_arm, reference="baseline", pairs=[tuple(p) for p in study.get("compare", [])])
    report["teacher"] = json.loads(teacher_eval.read_text())
    report["diagnostics"] = {arm: {"seeds": arm_seeds, **study_report(
        {arm: [json.loads((runs / f"{arm}-seed{seed}" / "eval.json").read_text())["mAP"] for seed in arm_seeds]},
        reference="")["arms"][arm]} for arm, arm_seeds in diagnostics.items()}
    report["seeds"] = seeds
    report["wall_seconds"] = time.perf_counter() - start
    report["step_seconds"] = seconds
    report["device"] = args.device
    report["jobs"] = args.jobs
    report["params"] = str(args.params)
    report["settings"] = {name: params[name] for name in ("synth", "teacher", "extract", *arms, *diagnostics)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot_study(report, args.plot)
    for arm, row in report["arms"].items():
        print(f"{arm:<24} mAP {row['mean']:.4f} +- {row['std']:.4f}  {[round(v, 4) for v in row['mAP']]}")
    print(f"teacher mAP {report['teacher']['mAP']:.4f}; wall {report['wall_seconds']:.0f} s; wrote {args.out}, {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
