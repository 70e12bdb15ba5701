"""The pipeline's report: one summary JSON, curves as CSV for ``dvc plots``, and PNGs.

``metrics/summary.json`` maps each run (teacher, baseline, pkd_offline, pkd_online) to its COCO box
AP (``mAP`` 0..1 and the other COCO figures) and ``sec_per_iter`` (median wall seconds per training
step, data loading included).
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pkd_offline.checkpoint import load_detector  # noqa: E402
from pkd_offline.config import setting  # noqa: E402
from pkd_offline.data import CocoDetection  # noqa: E402
from pkd_offline.views import View  # noqa: E402


@dataclass
class ReportConfig:
    """What the report reads (runs/NAME/, metrics/NAME.json, the val images) and where it writes."""

    runs: Path = setting(Path("runs"), help="directory of the training runs, one per name")
    metrics: Path = setting(Path("metrics"), help="directory of each run's metrics JSON; summary.json goes here")
    plots: Path = setting(Path("plots"), help="directory of the curves (CSV) and figures (PNG)")
    data: Path = setting(Path("data/synth"), help="data directory whose val split the feature figure shows")
    names: tuple[str, ...] = setting(("teacher", "baseline", "pkd_offline", "pkd_online"), help="the runs reported")
    feature_image: int = setting(0, help="index of the val image in the feature figure")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def summarise(cfg: ReportConfig) -> dict:
    summary = {}
    for name in cfg.names:
        metrics_file = cfg.metrics / f"{name}.json"
        if not metrics_file.exists():
            continue
        log = read_jsonl(cfg.runs / name / "log.jsonl")
        steps = [r["sec"] for r in log[5:]] or [r["sec"] for r in log]
        summary[name] = {**json.loads(metrics_file.read_text()),
                         "sec_per_iter": statistics.median(steps) if steps else None, "iters": len(log)}
    return summary


def write_curves(cfg: ReportConfig) -> None:
    """plots/loss_NAME.csv (iter, loss, loss_det, loss_pkd) and plots/map_NAME.csv (iter, mAP)."""
    cfg.plots.mkdir(parents=True, exist_ok=True)
    for name in cfg.names:
        log = read_jsonl(cfg.runs / name / "log.jsonl")
        with open(cfg.plots / f"loss_{name}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["iter", "loss", "loss_det", "loss_pkd"])
            writer.writerows([r["iter"], round(r["loss"], 5), round(r["loss_det"], 5), round(r["loss_pkd"], 5)] for r in log)
        evals = read_jsonl(cfg.runs / name / "eval.jsonl")
        with open(cfg.plots / f"map_{name}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["iter", "mAP"])
            writer.writerows([r["iter"], round(r["mAP"], 5)] for r in evals)


def plot_curves(cfg: ReportConfig, summary: dict) -> Path:
    figure, (loss_axis, map_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for name in cfg.names:
        log = read_jsonl(cfg.runs / name / "log.jsonl")
        if log:
            loss_axis.plot([r["iter"] for r in log], [r["loss_det"] for r in log], label=name, lw=0.8)
        evals = read_jsonl(cfg.runs / name / "eval.jsonl")
        if evals:
            map_axis.plot([r["iter"] for r in evals], [r["mAP"] for r in evals], marker="o", label=name)
    loss_axis.set(title="detection loss (L_det)", xlabel="iteration", yscale="log")
    map_axis.set(title="val COCO box mAP", xlabel="iteration")
    for axis in (loss_axis, map_axis):
        axis.legend()
        axis.grid(alpha=0.3)
    path = cfg.plots / "curves.png"
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_features(cfg: ReportConfig) -> Path | None:
    """Teacher and student FPN maps of one val image side by side (mean |activation| over channels)."""
    runs = [name for name in cfg.names if (cfg.runs / name / "model.pt").exists()]
    if not runs:
        return None
    models = {name: load_detector(cfg.runs / name / "model.pt") for name in runs}
    _, content = next(iter(models.values()))
    dataset = CocoDetection(cfg.data, "val", [View.from_dict(content["views"][0])])
    item = dataset[(cfg.feature_image, 0)]
    strides = (8, 16, 32)
    figure, axes = plt.subplots(len(runs), len(strides) + 1, figsize=(3 * (len(strides) + 1), 3 * len(runs)),
                                squeeze=False)
    for row, name in enumerate(runs):
        model, _ = models[name]
        model.eval()
        with torch.no_grad():
            features, _ = model.features([item["image"]])
        axes[row, 0].imshow(item["image"].permute(1, 2, 0).numpy())
        axes[row, 0].set_ylabel(name)
        for column, stride in enumerate(strides, start=1):
            axes[row, column].imshow(features[stride][0].abs().mean(0).numpy(), cmap="magma")
            axes[row, column].set_title(f"{name} P{stride.bit_length() - 1}", fontsize=9)
        for axis in axes[row]:
            axis.set_xticks([])
            axis.set_yticks([])
    path = cfg.plots / "features.png"
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def report(cfg: ReportConfig) -> Path:
    summary = summarise(cfg)
    cfg.metrics.mkdir(parents=True, exist_ok=True)
    path = cfg.metrics / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    write_curves(cfg)
    plot_curves(cfg, summary)
    plot_features(cfg)
    return path


if __name__ == "__main__":
    print(report(ReportConfig()))
