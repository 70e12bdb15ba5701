"""Result files: each benchmark's JSON carries its provenance and is named by it,
``BENCHMARK-PAIR-DEVICE-CODEC-DATE-COMMIT.json`` (e.g. ``gpu_check-paper-h200-pca-2026-11-26-5673159.json``),
so ``benchmarks/results/`` sorts by what was measured and ``python -m benchmarks.table`` can pick the newest.

The commit is ``$PKD_COMMIT`` where set (a checkout copied without ``.git``), else ``git rev-parse`` of this
checkout, else ``unknown``; ``dirty`` says whether tracked files differed from it.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"^(?P<benchmark>[a-z0-9_]+)-(?P<pair>[a-z0-9_]+)-(?P<device>[a-z0-9_]+)-(?P<codec>[a-z0-9_]+)-"
                  r"(?P<date>\d{4}-\d{2}-\d{2})-(?P<commit>[0-9a-f]{7,40}|unknown)\.json$")
VENDOR_WORDS = {"nvidia", "amd", "tesla", "geforce"}


def device_slug(device: str) -> str:
    """A device name as one file-name word: ``NVIDIA H200`` -> ``h200``, ``NVIDIA H100 80GB HBM3`` -> ``h100``,
    ``cpu`` -> ``cpu`` (the first word that is not a vendor's, lower case, letters and digits only)."""
    words = [word for word in re.split(r"[^a-z0-9]+", device.lower()) if word and word not in VENDOR_WORDS]
    return words[0] if words else "unknown"


def git_commit() -> tuple[str, bool | None]:
    """(short commit, dirty) of this checkout; ``$PKD_COMMIT`` wins; ("unknown", None) without git."""
    if os.environ.get("PKD_COMMIT"):
        return os.environ["PKD_COMMIT"][:7], None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT, capture_output=True).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown", None
    return commit, dirty


def provenance(benchmark: str, pair: str, device: str, codec: str, machine: str) -> dict:
    """What a result file records about itself: benchmark, pair, device (its file-name word), codec, machine (in
    words: device name and CPUs), UTC date and time, commit and whether the checkout was dirty."""
    commit, dirty = git_commit()
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"benchmark": benchmark, "pair": pair, "device": device_slug(device), "codec": codec, "machine": machine,
            "date": now.date().isoformat(), "recorded_at": now.isoformat(timespec="seconds"), "commit": commit,
            "dirty": dirty}


def result_name(facts: dict) -> str:
    """The file name of a result with provenance ``facts``."""
    name = "-".join(str(facts[key]) for key in ("benchmark", "pair", "device", "codec", "date", "commit")) + ".json"
    if not NAME.match(name):
        raise ValueError(f"{name!r} does not fit BENCHMARK-PAIR-DEVICE-CODEC-DATE-COMMIT.json (one word each)")
    return name


def write_result(result: dict, folder: Path) -> Path:
    """``result`` (with its ``provenance``) as JSON in ``folder``, named by its provenance; returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / result_name(result["provenance"])
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return path
