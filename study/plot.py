"""The study's plot: each arm's mAP per seed (dots) and mean +- std (bar), from ``metrics/study.json``."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend choice)


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
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
