"""End to end: ``dvc repro`` of the project's real dvc.yaml, with params shrunk to seconds per stage."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dvc_repro_runs_the_whole_pipeline(tmp_path):
    if shutil.which("dvc") is None:
        pytest.skip("dvc is not installed")
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
    run = lambda *cmd: subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)  # noqa: E731
    assert run("git", "init", "-q").returncode == 0
    assert run("dvc", "init", "-q").returncode == 0
    result = run("dvc", "repro")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "metrics" / "summary.json").read_text())
    assert set(summary) == {"teacher", "baseline", "pkd_offline", "pkd_online"}
    for run_metrics in summary.values():
        assert 0.0 <= run_metrics["mAP"] <= 1.0 and run_metrics["sec_per_iter"] > 0
    assert (tmp_path / "plots" / "curves.png").stat().st_size > 10_000
    assert (tmp_path / "plots" / "features.png").stat().st_size > 10_000
    shown = run("dvc", "metrics", "show")
    assert shown.returncode == 0 and "pkd_offline" in shown.stdout
