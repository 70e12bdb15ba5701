"""The current performance table (markdown) from benchmarks/results/: the newest file per (benchmark, pair, device).

    python -m benchmarks.table [--results DIR]

A file counts when its name fits ``benchmarks.results.NAME`` and it holds JSON with a ``provenance``; the newest is
the latest ``recorded_at``. One row per (benchmark, pair, device): commit, date, machine, codec and the
benchmark's headline figures, each ratio beside its 95% interval where the file has one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.results import NAME, ROOT

# The figures a row shows, by benchmark (a key the file lacks is shown as "-").
HEADLINES = {
    "gpu_check": ("step_ratio_offline_over_alone", "step_ratio_online_over_alone", "offline_over_online",
                  "extract_ratio_over_forward", "read_rate_over_consumption"),
    "run": ("step_ratio_offline_over_alone", "step_ratio_online_over_alone", "offline_over_online",
            "extract_ratio_over_forward"),
}


def newest_results(folder: Path) -> dict[tuple[str, str, str], dict]:
    """{(benchmark, pair, device): the newest result in ``folder``}."""
    newest: dict[tuple[str, str, str], dict] = {}
    for path in sorted(folder.glob("*.json")):
        if not NAME.match(path.name):
            continue
        result = json.loads(path.read_text())
        facts = result.get("provenance") if isinstance(result, dict) else None
        if not facts:
            continue
        key = (facts["benchmark"], facts["pair"], facts["device"])
        if key not in newest or facts["recorded_at"] > newest[key]["provenance"]["recorded_at"]:
            newest[key] = result
    return newest


def cell(result: dict, key: str) -> str:
    """``value`` or ``value [low, high]`` to 3 decimals, from ``key`` or the pair-prefixed ``PAIR_key`` (the paper
    pair's run, quick or not, writes ``paper_``-prefixed headlines); ``-`` where the result has neither."""
    prefixed = f"{result['provenance']['pair'].removesuffix('_quick')}_{key}"
    key = key if key in result else prefixed
    value = result.get(key)
    if not isinstance(value, (int, float)):
        return "-"
    interval = result.get(f"{key}_ci95")
    return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def performance_table(folder: Path) -> str:
    """The markdown table: one section per benchmark, one row per (pair, device), newest first by date."""
    newest = newest_results(folder)
    lines: list[str] = []
    for benchmark in sorted({key[0] for key in newest}):
        figures = HEADLINES.get(benchmark, ())
        rows = sorted((r for k, r in newest.items() if k[0] == benchmark),
                      key=lambda r: r["provenance"]["recorded_at"], reverse=True)
        lines += [f"### {benchmark}", "", "| " + " | ".join(("pair", "device", "machine", "codec", "date", "commit",
                                                              *figures)) + " |",
                  "|" + "---|" * (6 + len(figures))]
        for result in rows:
            facts = result["provenance"]
            commit = facts["commit"] + ("+" if facts.get("dirty") else "")
            lines.append("| " + " | ".join((facts["pair"], facts["device"], facts["machine"], facts["codec"],
                                             facts["date"], commit, *(cell(result, key) for key in figures))) + " |")
        lines.append("")
    if not lines:
        return f"no result files named BENCHMARK-PAIR-DEVICE-CODEC-DATE-COMMIT.json in {folder}\n"
    lines.append("Ratios: median over blocks [95% bootstrap interval over blocks]; commit+ : uncommitted changes.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    print(performance_table(parser.parse_args().results), end="")


if __name__ == "__main__":
    main()
