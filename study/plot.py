"""The study's plots from ``metrics/study.json``: each arm's mAP per seed (dots) and mean +- std (bar); and the bits
study's mAP against the store's bits per value."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend choice)


def _save(fig, out: Path) -> Path:
    """Write ``fig`` to the PNG ``out`` (its folder made) and close it."""
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _arm_point(ax, x: float, arm: dict) -> None:
    """An arm at ``x``: its mean +- std as a bar and each seed's mAP as a dot."""
    ax.errorbar([x], [arm["mean"]], yerr=[arm["std"]], fmt="o", color="black", capsize=5)
    ax.scatter([x] * len(arm["mAP"]), arm["mAP"], color="tab:blue", s=12, zorder=3)


def _label(ax, xlabel: str, title: str) -> None:
    """Axis labels (box mAP on y), title and grid of a study plot."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("box mAP (val)")
    ax.set_title(title)
    ax.grid(alpha=0.3)


def _baseline_band(ax, report: dict) -> None:
    """The baseline arm's mean +- std as a grey band (if the report has the arm)."""
    if "baseline" in report["arms"]:
        base = report["arms"]["baseline"]
        ax.axhspan(base["mean"] - base["std"], base["mean"] + base["std"], color="tab:gray", alpha=0.25,
                   label=f"baseline (no PKD) {base['mean']:.3f}")


def plot_study(report: dict, out: Path) -> Path:
    """Write a PNG of ``report["arms"]`` (names and seed counts on x, box mAP on y from a tenth below the lowest
    seed); the teacher's mAP as a line if present."""
    names = list(report["arms"])
    fig, ax = plt.subplots(figsize=(max(1.2 * len(names) + 2.5, 6.5), 4.0))  # wide enough for the title
    for x, name in enumerate(names):
        arm = report["arms"][name]
        ax.errorbar([x], [arm["mean"]], yerr=[arm["std"]], fmt="o", color="black", capsize=6, markersize=7)
        ax.scatter([x + 0.12] * len(arm["mAP"]), arm["mAP"], color="tab:blue", s=12, zorder=3)
    if report.get("teacher"):
        ax.axhline(report["teacher"]["mAP"], color="tab:red", linestyle="--", linewidth=1,
                   label=f"teacher {report['teacher']['mAP']:.3f}")
        ax.legend(loc="lower right")
    labels = [f"{name} (n={len(report['arms'][name]['mAP'])})" for name in names]  # seeds per arm: a partial study
    ax.set_xticks(range(len(names)), labels, rotation=25, ha="right")
    ax.set_ylabel("box mAP (val)")
    lowest = min(min(arm["mAP"]) for arm in report["arms"].values())
    ax.set_ylim(bottom=max(0.0, math.floor(10 * lowest - 0.5) / 10))  # zoomed: the arms differ by hundredths
    ax.set_title("Accuracy study: mean +- std over n seeds (dots: single seeds)")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


def plot_bits(report: dict, out: Path) -> Path:
    """Write a PNG of the codec arms' mAP (mean +- std, dots per seed) against bits per stored value
    (``report["codec_points"]``, log2 axis), with the baseline's mean +- std as a band and the teacher as a line."""
    points = sorted(report["codec_points"].items(), key=lambda item: item[1]["bits_per_value"])
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for name, point in points:
        arm, bits = report["arms"][name], point["bits_per_value"]
        _arm_point(ax, bits, arm)
        ax.annotate(point["codec"], (bits, arm["mean"]), textcoords="offset points", xytext=(6, -12), fontsize=8)
    _baseline_band(ax, report)
    if report.get("teacher"):
        ax.axhline(report["teacher"]["mAP"], color="tab:red", linestyle="--", linewidth=1,
                   label=f"teacher {report['teacher']['mAP']:.3f}")
    ax.set_xscale("log", base=2)
    _label(ax, "bits per stored value (on disk, after zstd)",
           "Bits study: offline PKD (index) mAP against store bits")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, out)


def plot_convergence(report: dict, out: Path) -> Path:
    """Write a PNG of mAP against training iteration (``report["convergence"]``: evaluations during each run),
    mean over the seeds that have every point, per arm, with the seeds as faint lines."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours: no two arms share one
    for index, (name, curve) in enumerate(sorted(report["convergence"].items())):
        color = "black" if name == "baseline" else colors[index % len(colors)]
        per_seed = list(zip(*curve["mAP"]))  # (seeds, iters)
        for values in per_seed:
            ax.plot(curve["iters"], values, color=color, alpha=0.25, linewidth=1)
        means = [sum(row) / len(row) for row in curve["mAP"]]
        ax.plot(curve["iters"], means, "o-", color=color, label=f"{name} (n={len(curve['seeds'])})")
    _label(ax, "training iteration",
           "Convergence: mAP during training (mean over seeds; faint: single seeds)")
    ax.legend(loc="lower right", fontsize=7, ncol=2)
    return _save(fig, out)


def plot_loss_weight(report: dict, out: Path) -> Path:
    """Write a PNG of offline PKD's mAP (mean +- std, dots per seed) against its loss weight alpha (log2 axis),
    ``report["questions"]["loss_weight"]``, with the baseline's mean +- std as a band."""
    weights = report["questions"]["loss_weight"]["weights"]
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for weight, row in weights.items():
        _arm_point(ax, float(weight), row)
    _baseline_band(ax, report)
    if "baseline" in report["arms"]:
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xscale("log", base=2)
    _label(ax, "PKD loss weight alpha",
           "Loss weight: offline PKD (index, fp32 store)")
    return _save(fig, out)
