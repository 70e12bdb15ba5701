"""End to end: ``dvc repro`` of the project's real dvc.yaml, with params shrunk to seconds per stage."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dvc_repro_runs_the_whole_pipeline(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    text = (ROOT / "params.yaml").read_text()
    text = text.replace("train: 128", "train: 8").replace("val: 32", "val: 4")
    for key, small in (("iters: 400", "iters: 4"), ("iters: 300", "iters: 3"), ("eval_every: 100", "eval_every: 2")):
        text = text.replace(key, small)
    (tmp_path / "params.yaml").write_text(text)
    assert yaml.safe_load(text)["teacher"]["iters"] == 4 and params["teacher"]["iters"] > 4
    for link in ("stages", "pkd_offline", "storage"):
        (tmp_path / link).symlink_to(ROOT / link)
    # dvc is a hard dependency: run the one installed beside this Python (no PATH lookup, no skip).
    # No analytics and no update check, and both endpoints on a closed loopback port: nothing leaves the machine.
    # The stages call `pkd-offline` and `python`: take them from this Python's bin directory (no venv activation).
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "DVC_NO_ANALYTICS": "1", "DVC_ANALYTICS_ENDPOINT": "http://127.0.0.1:9",
           "DVC_UPDATER_ENDPOINT": "http://127.0.0.1:9", "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site-cache")}

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return run(sys.executable, "-m", "dvc", *args)

    assert run("git", "init", "-q").returncode == 0
    assert dvc("init", "-q").returncode == 0
    for setting in ("core.check_update", "core.analytics"):
        assert dvc("config", "--local", setting, "false").returncode == 0
    result = dvc("repro")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "metrics" / "summary.json").read_text())
    assert set(summary) == {"teacher", "baseline", "pkd_offline", "pkd_online"}
    for run_metrics in summary.values():
        assert 0.0 <= run_metrics["mAP"] <= 1.0 and run_metrics["sec_per_iter"] > 0
    assert (tmp_path / "plots" / "curves.png").stat().st_size > 10_000
    assert (tmp_path / "plots" / "features.png").stat().st_size > 10_000
    shown = dvc("metrics", "show")
    assert shown.returncode == 0 and "pkd_offline" in shown.stdout
