"""Run the accuracy study with one command and write ``metrics/study.json`` and ``plots/study.png``.

    python -m study.run                                  # everything in study/params.yaml, on the CPU
    python -m study.run --device cuda --jobs 6           # on a GPU, six student runs at a time
    python -m study.run --arms baseline offline_index --seeds 0 1   # a subset (the JSON says what ran)
    OMP_NUM_THREADS=1 python -m study.run                # on a CPU shared with other jobs: one torch thread a run
                                                         # (more threads than free cores slow every step)
    python -m study.run --jobs 2 --first offline_index   # every offline_index seed before the other distilled runs
    python -m study.run --report-only                    # a stopped study: report the runs that finished
    python -m study.run --codec-arms                     # also the bits study's arms (offline_index_CODEC): one
                                                         # store per codec (study.stores), 3 seeds each
    python -m study.run --questions                      # also the paper's questions (study.questions): MSE
                                                         # imitation, the loss weight, another student family
    python -m study.run --iters 750 --out metrics/study-750it.json --plot plots/study-750it.png
                                                         # every student arm at another schedule length: its runs
                                                         # in RUNS-750it, the teacher and store the study's own

Steps, each skipped when its output already exists (so a stopped study resumes; ``--fresh`` redoes all; a run is
finished when the ledger (``--ledger``, by default ``metrics/study-runs.json`` beside the report) holds it, so seeds run
in another session on another machine count):
synthetic data -> teacher (trained once) -> teacher eval -> feature store (extracted once) -> every
(arm, seed) student run and its eval -> aggregation (``study.aggregate``) -> plot (``study.plot``).
Every step is a ``pkd-offline`` command (``python -m pkd_offline``) over ``study/params.yaml``: each arm
is a ``train`` section of that file, so any one run can be repeated by hand with the printed command.
Each finished step's seconds go to ``RUNS/logs/steps.jsonl`` as it ends, so a stopped study keeps them;
the JSON's ``seeds_per_arm`` and ``complete`` say which runs a report covers.
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

from study.aggregate import codec_decision, study_report
from study.ledger import Ledger, run_name
from study.plot import plot_bits, plot_convergence, plot_loss_weight, plot_study
from study.questions import convergence_gaps, question_arms, question_report

CLI = [sys.executable, "-m", "pkd_offline"]


STEP_TIMES = "steps.jsonl"  # beside the step logs: one {"step", "seconds", "end" (Unix s)} line per finished step


def run_command(args: list[str], log: Path) -> float:
    """Run one CLI command, its output to ``log``; returns wall seconds, also appended to ``STEP_TIMES`` beside the
    log (so a study stopped early keeps its timings); raises SystemExit naming the log on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("+ " + " ".join(args[2:]), flush=True)
    tick = time.perf_counter()
    with open(log, "w") as handle:
        code = subprocess.call(args, stdout=handle, stderr=subprocess.STDOUT)
    if code != 0:
        tail = log.read_text().splitlines()[-3:]
        raise SystemExit(f"study: step failed (exit {code}), see {log}: {' | '.join(tail)}")
    seconds = time.perf_counter() - tick
    with open(log.parent / STEP_TIMES, "a") as handle:
        handle.write(json.dumps({"step": log.stem, "seconds": seconds, "end": time.time()}) + "\n")
    return seconds


def recorded_step_seconds(logs: Path) -> dict[str, float]:
    """``{step: seconds}`` from ``logs/STEP_TIMES`` (the last line wins for a step run twice); {} if none."""
    path = logs / STEP_TIMES
    if not path.exists():
        return {}
    return {row["step"]: row["seconds"] for row in map(json.loads, path.read_text().splitlines()) if row}


def finished_seeds(ledger: Ledger, wanted: dict[str, list[int]]) -> dict[str, list[int]]:
    """Each arm's seeds (of ``wanted``) whose evaluated run the ledger holds; arms with none are left out."""
    done = {arm: [seed for seed in seeds if ledger.has(arm, seed)] for arm, seeds in wanted.items()}
    return {arm: seeds for arm, seeds in done.items() if seeds}


def job_order(arms: list[str], seeds: list[int], diagnostics: dict[str, list[int]], distilled: list[str],
              first: list[str]) -> list[tuple[str, int]]:
    """(arm, seed) runs in start order: every run that needs no teacher (they overlap the teacher chain when
    --jobs > 1), then the distilled runs; within each group the ``first`` arms' seeds, then the rest seed-major (a
    study stopped early still covers every arm), then the diagnostics."""
    ahead = [(arm, seed) for arm in first for seed in seeds]
    jobs = ahead + [(arm, seed) for seed in seeds for arm in arms if (arm, seed) not in ahead] \
        + [(arm, seed) for arm, arm_seeds in diagnostics.items() for seed in arm_seeds]
    return sorted(jobs, key=lambda job: job[0] in distilled)  # stable: keeps the order inside each group


def recorded_span(logs: Path, keep=lambda step: True) -> float | None:
    """Seconds from the earliest recorded step's start to the latest one's end (``logs/STEP_TIMES`` lines that
    carry "end" and whose step name ``keep`` accepts): a stopped or resumed study's wall time; None if no line has
    one."""
    path = logs / STEP_TIMES
    rows = [row for row in map(json.loads, path.read_text().splitlines()) if "end" in row and keep(row["step"])] \
        if path.exists() else []
    if not rows:
        return None
    return max(row["end"] for row in rows) - min(row["end"] - row["seconds"] for row in rows)


def store_point(store: str, extract_section: dict) -> dict:
    """A store's ``{"codec", "pca_step", "bits_per_value", "digest"}``: bits on disk per stored feature value
    (every level, after the codec and zstd: 32 times its level bytes over the same maps as float32) and the
    content digest of ``storage.describe``. Reads the whole store."""
    from storage import describe, open_store
    from storage.pca_basis import DEFAULT_STEP

    summary = describe(open_store(store))
    levels = summary["levels"].values()
    codec = extract_section.get("codec", "fp16")
    return {"codec": codec, "pca_step": extract_section.get("pca_step", DEFAULT_STEP) if codec == "pca" else None,
            "bits_per_value": 32 * sum(level["bytes_per_image"] for level in levels)
            / sum(level["fp32_bytes_per_image"] for level in levels), "digest": summary["digest"]}


def record_stores(params: dict, ledger: Ledger) -> None:
    """Put every extracted study store into the ledger. A store that differs from the ledger's entry (extracted
    again from a teacher trained again) replaces it, the old entry kept under "replaced": runs pair by seed, and a
    seed's runs share one teacher and its stores."""
    study = params["study"]
    for store, section in (study.get("stores") or {study["store"]: "extract"}).items():
        if section not in params or not Path(store, "manifest.json").exists():
            continue  # (not extracted, or made outside the study)
        point = store_point(store, params[section])
        recorded = ledger.stores.get(store)
        if recorded is None:
            ledger.record_store(store, point)
        elif (recorded["digest"] != point["digest"] if "digest" in recorded  # (entries from before digests: by size)
              else recorded["bits_per_value"] != point["bits_per_value"]):
            replaced = [*recorded.pop("replaced", []), recorded]
            print(f"study: {store} is not the store the ledger recorded ({point['bits_per_value']:.4f} vs "
                  f"{recorded['bits_per_value']:.4f} bits a value): recorded as its new version", file=sys.stderr)
            ledger.record_store(store, {**point, "replaced": replaced})
        elif "digest" not in recorded:
            ledger.record_store(store, {**recorded, **point})


def codec_points(params: dict, arms: list[str], ledger: Ledger) -> dict[str, dict]:
    """``{arm: {"codec", "pca_step", "store", "bits_per_value"}}`` for the study's codec arms (and their aliases)
    whose store the ledger holds: the x axis of the bits plot and the codec decision's sizes."""
    study = params["study"]
    points = {}
    for arm in arms:
        store = params[study.get("aliases", {}).get(arm, arm)].get("features")
        if arm.startswith("offline_index_") and store in ledger.stores:
            entry = ledger.stores[store]
            points[arm] = {"codec": entry["codec"], "pca_step": entry.get("pca_step"), "store": store,
                           "bits_per_value": entry["bits_per_value"]}
    return points


def convergence(ledger: Ledger, arm_seeds: dict[str, list[int]]) -> dict[str, dict]:
    """``{arm: {"iters": [...], "seeds": [...], "mAP": [[per seed] per iter]}}`` for arms whose runs evaluated
    during training (``eval_every``): the seeds that have every listed iteration."""
    curves = {}
    for arm, seeds in arm_seeds.items():
        evals = {seed: {row["iter"]: row["mAP"] for row in ledger.runs.get(run_name(arm, seed), {}).get("evals", [])}
                 for seed in seeds}  # (an alias arm has no runs of its own)
        with_evals = [seed for seed in seeds if evals[seed]]
        if with_evals:
            iters = sorted(set.intersection(*(set(evals[seed]) for seed in with_evals)))
            curves[arm] = {"iters": iters, "seeds": with_evals,
                           "mAP": [[evals[seed][it] for seed in with_evals] for it in iters]}
    return curves


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
    parser.add_argument("--first", nargs="+", metavar="ARM",
                        help="run every seed of these arms before the other arms' runs (default: seed-major order)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: report the runs that have an eval.json (a study stopped early)")
    parser.add_argument("--iters", type=int,
                        help="every student arm's schedule length instead of the params' (the teacher and its store "
                             "stay): runs go to RUNS-<N>it beside the study's runs")
    parser.add_argument("--codec-arms", action="store_true",
                        help="also run (or report) study.codec_arms: offline PKD from a store per codec")
    parser.add_argument("--questions", action="store_true",
                        help="also run (or report) study.questions' arms: MSE imitation, loss weights, FCOS")
    parser.add_argument("--ledger", type=Path,
                        help="the finished runs' record (default: beside --out, STEM-runs.json; commit it)")
    args = parser.parse_args(argv)
    params = yaml.safe_load(args.params.read_text())
    study = params["study"]
    codec_arms = study.get("codec_arms", []) if args.codec_arms else []
    questions = study.get("questions") if args.questions else None
    extra_arms = [*codec_arms, *(question_arms(questions) if questions else [])]
    arms, seeds = args.arms or list(dict.fromkeys([*study["arms"], *extra_arms])), args.seeds or study["seeds"]
    diagnostics = study.get("diagnostics", {}) if args.diagnostics else {}
    unknown = [arm for arm in [*arms, *diagnostics, *(args.first or [])] if not isinstance(params.get(arm), dict)]
    if unknown:
        parser.error(f"no train section for arm(s) {', '.join(unknown)} in {args.params}")
    data, runs = Path(study["data"]), Path(study["runs"])
    # The teacher (and the stores made from it): the study's whatever the students' schedule, or another study's
    # (study.teacher_runs) when two settings share one teacher.
    teacher_runs = Path(study.get("teacher_runs", runs))
    if args.iters is not None:
        if args.iters < 1:
            parser.error(f"--iters must be >= 1, got {args.iters}")
        runs = runs.with_name(f"{runs.name}-{args.iters}it")
    stores = study.get("stores") or {study["store"]: "extract"}  # store path -> its extract section
    if args.fresh:
        for path in (data, runs, *map(Path, stores)):
            shutil.rmtree(path, ignore_errors=True)
    ledger = Ledger(args.ledger or args.out.with_name(f"{args.out.stem}-runs.json"))

    def run_notes(arm: str) -> dict:
        """The teacher a distilled arm learnt from, by its mAP (None where it is not evaluated yet)."""
        distils = params.get(arm, {}).get("features") or params.get(arm, {}).get("teacher")
        if not distils or not (teacher_runs / "teacher" / "eval.json").exists():
            return {}
        return {"teacher_mAP": json.loads((teacher_runs / "teacher" / "eval.json").read_text())["mAP"]}
    ledger.absorb(runs, run_notes)
    common = ["--params", str(args.params), "--no-progress"]
    device = ["--device", args.device]
    seconds: dict[str, float] = {}
    start = time.perf_counter()

    if not args.report_only and not (data / "annotations" / f"instances_{params['eval']['split']}.json").exists():
        seconds["data"] = run_command(CLI + ["data", "synth", "--params", str(args.params), "--out", str(data)],
                                      runs / "logs" / "data.log")
    teacher = teacher_runs / "teacher" / "model.pt"
    teacher_eval = teacher_runs / "teacher" / "eval.json"
    wanted_stores = {params[arm]["features"] for arm in [*arms, *diagnostics] if params[arm].get("features")}
    missing = sorted(wanted_stores - set(stores))
    if missing and not args.report_only:
        parser.error(f"no extract section for store(s) {', '.join(missing)}: add them to study.stores")

    def teacher_chain() -> None:
        """Train and evaluate the teacher once, then extract its features once."""
        if not teacher.exists():
            seconds["teacher"] = run_command(CLI + ["train", *common, "--section", "teacher", "--out", str(teacher.parent),
                                                    *device], teacher_runs / "logs" / "teacher.log")
        if not teacher_eval.exists():
            seconds["teacher_eval"] = run_command(CLI + ["eval", *common, "--section", "eval", "--checkpoint", str(teacher),
                                                         "--out", str(teacher_eval), *device],
                                                  teacher_runs / "logs" / "teacher_eval.log")
        for store, section in stores.items():
            if store in wanted_stores and not Path(store, "manifest.json").exists():
                seconds[section] = run_command(CLI + ["extract", *common, "--section", section, "--out", store,
                                                      "--overwrite", *device], teacher_runs / "logs" / f"{section}.log")
        record_stores(params, ledger)

    def one_run(arm: str, seed: int, ready=None) -> None:
        if ready is not None:
            ready.result()  # the teacher and store this arm distils from; re-raises the chain's failure
        if ledger.has(arm, seed):
            return
        out = runs / run_name(arm, seed)
        if not (out / "model.pt").exists():
            seconds[f"{arm}-seed{seed}"] = run_command(
                CLI + ["train", *common, "--section", arm, "--seed", str(seed), "--out", str(out), *device, *iters],
                runs / "logs" / f"{arm}-seed{seed}.log")
        if not (out / "eval.json").exists():
            seconds[f"{arm}-seed{seed}-eval"] = run_command(
                CLI + ["eval", *common, "--section", "eval", "--checkpoint", str(out / "model.pt"),
                       "--out", str(out / "eval.json"), *device], runs / "logs" / f"{arm}-seed{seed}-eval.log")
        ledger.record_run(arm, seed, out, run_notes(arm))

    # The teacher chain is submitted first, then the runs in job_order. With --jobs 1 nothing waits on a future
    # that has no worker.
    iters = [] if args.iters is None else ["--iters", str(args.iters)]
    distilled = [arm for arm in [*arms, *diagnostics] if params[arm].get("features") or params[arm].get("teacher")]
    if not args.report_only:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            chain = pool.submit(teacher_chain)
            runs_done = [pool.submit(one_run, arm, seed, chain if arm in distilled else None)
                         for arm, seed in job_order(arms, seeds, diagnostics, distilled, args.first or [])]
            for future in [chain, *runs_done]:
                future.result()

    if args.report_only and not args.arms:  # every arm that has runs, the codec arms too (and the questions' asked)
        arms = list(dict.fromkeys([*study["arms"], *study.get("codec_arms", []), *extra_arms]))
    reported = {arm: seeds for arm in arms}
    if args.report_only and not args.seeds:  # every seed that finished, the extra seeds of a spread check too
        reported = {arm: sorted(set(seeds) | set(ledger.seeds(arm))) for arm in arms}
    arm_seeds = finished_seeds(ledger, reported)
    for alias, arm in study.get("aliases", {}).items():  # one arm under two names (the fp16 store is the study's)
        if arm in arm_seeds and alias not in arm_seeds:
            arm_seeds[alias] = arm_seeds[arm]
    diagnostic_seeds = finished_seeds(ledger, diagnostics)
    per_arm = {arm: [ledger.map_of(study.get("aliases", {}).get(arm, arm), seed) for seed in done]
               for arm, done in arm_seeds.items()}
    if not per_arm:
        raise SystemExit(f"study: no finished run (in {ledger.path} or under {runs}) for the arms asked")
    report = study_report(per_arm, reference="baseline", pairs=[tuple(p) for p in study.get("compare", [])],
                          seeds=arm_seeds)
    report["teacher"] = json.loads(teacher_eval.read_text()) if teacher_eval.exists() else None
    report["diagnostics"] = {arm: {"seeds": done, **study_report(
        {arm: [ledger.map_of(arm, seed) for seed in done]}, reference="")["arms"][arm]}
        for arm, done in diagnostic_seeds.items()}
    report["seeds"] = seeds
    report["seeds_per_arm"] = arm_seeds
    report["complete"] = all(set(seeds) <= set(arm_seeds.get(arm, [])) for arm in arms)
    codec_runs = tuple(f"{arm}-seed" for arm in study.get("codec_arms", []))
    codec_extracts = {section for section in stores.values() if section != "extract"}

    def is_codec_step(step: str) -> bool:
        """A step of the codec arms (their runs, evals and stores): timed apart from the main study."""
        return step.startswith(codec_runs) or step in codec_extracts

    def is_extra_seed_step(step: str) -> bool:
        """A run or eval of a seed beyond the study's seeds (a spread check): timed apart too."""
        seed = step.partition("-seed")[2].removesuffix("-eval")
        return seed.isdigit() and int(seed) not in seeds

    diagnostic_runs = tuple(f"{arm}-seed" for arm in study.get("diagnostics", {}))

    def is_diagnostic_step(step: str) -> bool:
        """A run or eval of a side run (study.diagnostics): timed apart too."""
        return step.startswith(diagnostic_runs)

    def is_main_step(step: str) -> bool:
        return not is_codec_step(step) and not is_extra_seed_step(step) and not is_diagnostic_step(step)
    if args.report_only:  # nothing ran now: the recorded steps' span, and their times summed (side by side overlap)
        report["step_seconds"] = recorded_step_seconds(runs / "logs")
        report["wall_seconds"] = recorded_span(runs / "logs", is_main_step)
        report["step_seconds_sum"] = sum(v for k, v in report["step_seconds"].items() if is_main_step(k))
        if any(arm in arm_seeds for arm in study.get("codec_arms", [])):
            report["codec_arms_wall_seconds"] = recorded_span(runs / "logs", is_codec_step)
        if any(is_extra_seed_step(step) for step in report["step_seconds"]):
            report["extra_seeds_wall_seconds"] = recorded_span(runs / "logs", is_extra_seed_step)
        if any(is_diagnostic_step(step) for step in report["step_seconds"]):
            report["diagnostics_wall_seconds"] = recorded_span(runs / "logs", is_diagnostic_step)
    else:
        report["wall_seconds"] = time.perf_counter() - start
        report["step_seconds"] = seconds
    record_stores(params, ledger)
    report["codec_points"] = codec_points(params, list(arm_seeds), ledger)
    teachers: dict[str, set[int]] = {}  # a teacher trained again elsewhere: which seeds learnt from which
    for arm, done in arm_seeds.items():
        for seed in done:
            teacher_map = ledger.runs.get(run_name(arm, seed), {}).get("teacher_mAP")
            if teacher_map is not None:
                teachers.setdefault(f"{teacher_map:.4f}", set()).add(seed)
    report["teacher_mAP_seeds"] = {teacher_map: sorted(seeds) for teacher_map, seeds in sorted(teachers.items())}
    report["convergence"] = convergence(ledger, {**arm_seeds, **diagnostic_seeds})
    by_seed = {arm: dict(zip(done, per_arm[arm])) for arm, done in arm_seeds.items()}  # {arm: {seed: mAP}}
    rule = study.get("codec_rule")
    if rule and rule["reference"] in arm_seeds and rule["baseline"] in arm_seeds:
        teacher_seeds = report["teacher_mAP_seeds"]
        teacher_of = {seed: teacher_map for teacher_map, seeds in teacher_seeds.items() for seed in seeds}
        if len(teacher_of) < sum(map(len, teacher_seeds.values())):  # a seed that learnt from two teachers
            teacher_of = None
        report["codec_decision"] = codec_decision(by_seed, report["codec_points"], rule, teacher_of)
    if questions:
        report["questions"] = question_report(by_seed, questions)
        family_baselines = {arms["offline"]: arms["baseline"] for arms in questions.get("student_family", {}).values()}
        report["questions"]["convergence_gaps"] = convergence_gaps(report["convergence"], questions["baseline"],
                                                                   family_baselines)
    report["device"] = args.device
    report["jobs"] = args.jobs
    report["params"] = str(args.params)
    report["settings"] = {name: params.get(name) for name in ("synth", "teacher", "extract", *arms, *diagnostics)}
    if args.iters is not None:
        report["iters"] = args.iters
        report["settings"].update({arm: {**params[arm], "iters": args.iters} for arm in [*arms, *diagnostics]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot_study(report, args.plot)
    if any(arm in arm_seeds for arm in study.get("codec_arms", [])):  # not for the alias alone
        plot_bits(report, args.plot.with_name(args.plot.stem + "-bits.png"))
    if report["convergence"]:
        plot_convergence(report, args.plot.with_name(args.plot.stem + "-convergence.png"))
    if (report.get("questions") or {}).get("loss_weight"):
        plot_loss_weight(report, args.plot.with_name(args.plot.stem + "-loss-weight.png"))
    for arm, row in report["arms"].items():
        print(f"{arm:<24} mAP {row['mean']:.4f} +- {row['std']:.4f}  {[round(v, 4) for v in row['mAP']]}")
    teacher_map = f"{report['teacher']['mAP']:.4f}" if report["teacher"] else "(not evaluated)"
    wall = f"{report['wall_seconds']:.0f} s" if report["wall_seconds"] is not None else "(report only)"
    print(f"teacher mAP {teacher_map}; wall {wall}; wrote {args.out}, {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
