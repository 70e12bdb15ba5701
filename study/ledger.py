"""The study's ledger: every finished student run's evaluation, and every store's size and digest, in one committed
JSON file beside the report (``metrics/study-runs.json`` for ``metrics/study.json``).

Runs and stores are large and stay out of git; the ledger keeps what the report needs from them, so seeds added in a
later session on another machine pair with the ones already run (same teacher and stores: the ledger's store
digests say whether they are the same), and ``--report-only`` works without the run folders.

Layout::

    {"runs": {"ARM-seedN": {"mAP": float, "AP50": ..., "evals": [{"iter": int, "mAP": float, ...}, ...],
                            "teacher_mAP": float}},
     "stores": {"features/x.zarr": {"codec": str, "pca_step": float | None, "bits_per_value": float,
                                    "digest": str, "replaced": [earlier entries]}}}

``evals`` holds the evaluations made during training (``eval_every``), in iteration order; [] without them.
``teacher_mAP`` names the teacher a distilled run learnt from (a teacher trained again on another machine need not
come out bit for bit the same). Seed s gives both arms of a paired comparison the same initialisation and data order;
a seed is run once, so the two runs of a pair always share their teacher.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path


def run_name(arm: str, seed: int) -> str:
    """The run folder's and the ledger's name of one (arm, seed) run."""
    return f"{arm}-seed{seed}"


class Ledger:
    """The ledger file at ``path`` (empty until the first record); writes are whole-file and thread-safe (the
    driver's runs finish on pool threads)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        content = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.runs: dict[str, dict] = content.get("runs", {})
        self.stores: dict[str, dict] = content.get("stores", {})

    def has(self, arm: str, seed: int) -> bool:
        return run_name(arm, seed) in self.runs

    def map_of(self, arm: str, seed: int) -> float:
        """The run's final box mAP."""
        return self.runs[run_name(arm, seed)]["mAP"]

    def seeds(self, arm: str) -> list[int]:
        """Every seed of ``arm`` the ledger holds, ascending."""
        prefix = f"{arm}-seed"
        return sorted(int(name[len(prefix):]) for name in self.runs
                      if name.startswith(prefix) and name[len(prefix):].isdigit())

    def record_run(self, arm: str, seed: int, run_dir: Path, notes: dict | None = None) -> None:
        """Record the finished run in ``run_dir`` (its ``eval.json``, and ``eval.jsonl`` where training evaluated),
        with ``notes`` (e.g. ``{"teacher_mAP": ...}``) beside them."""
        final = json.loads((Path(run_dir) / "eval.json").read_text())
        during = Path(run_dir) / "eval.jsonl"
        evals = [json.loads(line) for line in during.read_text().splitlines() if line.strip()] if during.exists() else []
        with self._lock:
            self.runs[run_name(arm, seed)] = {**final, "evals": sorted(evals, key=lambda row: row["iter"]),
                                              **(notes or {})}
            self._write()

    def record_store(self, store: str, entry: dict) -> None:
        """Record a store's ``{"codec", "pca_step", "bits_per_value", "digest"}``."""
        with self._lock:
            self.stores[store] = entry
            self._write()

    def absorb(self, runs: Path, notes_of=lambda arm: None) -> list[str]:
        """Record every run under ``runs`` that has an ``eval.json`` and is not in the ledger yet (runs made before
        the ledger, or by hand), with ``notes_of(arm)``; returns their names."""
        added = []
        for evaluation in sorted(Path(runs).glob("*-seed*/eval.json")):
            arm, _, seed = evaluation.parent.name.rpartition("-seed")
            if seed.isdigit() and not self.has(arm, int(seed)):
                self.record_run(arm, int(seed), evaluation.parent, notes_of(arm))
                added.append(evaluation.parent.name)
        return added

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps({"runs": dict(sorted(self.runs.items())),
                                       "stores": dict(sorted(self.stores.items()))}, indent=1) + "\n")
        partial.replace(self.path)
