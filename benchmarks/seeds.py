"""Seed study of the demo: baseline vs offline PKD vs online PKD (and the index level map), mean and spread.

Runs after ``dvc repro`` (it reuses the demo's data, teacher and store) and trains each student
section of params.yaml once per seed, then evaluates on the val split:

    python -m benchmarks.seeds --seeds 0 1 2 --out metrics/seeds.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from pkd_offline.config import load_params, make_config
from stages.evaluate import EvalConfig, evaluate
from stages.train import TrainConfig, train
from storage import describe, open_store

RUNS = {  # name -> (params section, overrides)
    "baseline": ("baseline", {}),
    "pkd_offline": ("pkd_offline", {}),
    "pkd_online": ("pkd_online", {}),
    "pkd_offline_index": ("pkd_offline", {"level_map": "index"}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", nargs="+", default=list(RUNS))
    parser.add_argument("--work", type=Path, default=Path("runs/seeds"))
    parser.add_argument("--out", type=Path, default=Path("metrics/seeds.json"))
    parser.add_argument("--retrain", action="store_true", help="train again even where WORK/NAME-seedS/model.pt exists")
    args = parser.parse_args()
    results: dict[str, dict] = {}
    for name in args.runs:
        section, overrides = RUNS[name]
        maps, secs = [], []
        for seed in args.seeds:
            out = args.work / f"{name}-seed{seed}"
            cfg = make_config(TrainConfig, load_params(args.params, section),
                              {**overrides, "seed": seed, "out": out, "eval_every": 0, "progress": False})
            model_path = out / "model.pt"
            if args.retrain or not model_path.exists():  # a finished run of the same settings is reused
                model_path = train(cfg)
            stats = evaluate(EvalConfig(checkpoint=model_path, data=cfg.data, split="val", progress=False))
            log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
            maps.append(stats["mAP"])
            secs.append(statistics.median(r["sec"] for r in log[5:]))
            print(f"{name} seed {seed}: mAP {stats['mAP']:.4f}, {secs[-1]:.3f} s/iter", flush=True)
        results[name] = {"mAP": maps, "mAP_mean": statistics.mean(maps),
                         "mAP_std": statistics.stdev(maps) if len(maps) > 1 else 0.0,
                         "sec_per_iter_median": statistics.median(secs), "seeds": args.seeds,
                         "level_map": overrides.get("level_map", load_params(args.params, section).get("level_map"))}
    store_path = load_params(args.params, "pkd_offline")["features"]
    sizes = describe(open_store(store_path), digest=False)["levels"]
    results["store_bytes_per_sample"] = {
        "index (teacher P2-P5)": sum(sizes[s]["bytes_per_image"] for s in (4, 8, 16, 32)),
        "stride (teacher P3-P6)": sum(sizes[s]["bytes_per_image"] for s in (8, 16, 32, 64)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for name in args.runs:
        row = results[name]
        print(f"{name:<20} mAP {row['mAP_mean']:.4f} +- {row['mAP_std']:.4f} over seeds {row['seeds']}, "
              f"{row['sec_per_iter_median']:.3f} s/iter")
    print(json.dumps(results["store_bytes_per_sample"]))


if __name__ == "__main__":
    main()
