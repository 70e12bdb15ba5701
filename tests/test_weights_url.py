"""Weights named by URL: downloaded once into torch.hub's cache, hash-checked, never half-written, offline-safe.

A real HTTP server on 127.0.0.1 (the standard library's) serves checkpoints built here with the
project's own builders; the ``s3://`` case runs against a moto S3 server on the loopback interface,
started as ``tests/test_remote_store.py`` starts it. ``TORCH_HOME`` points into each test's tmp_path.
"""

from __future__ import annotations

import hashlib
import http.server
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from pkd_offline.checkpoint import save_checkpoint
from pkd_offline.cli import build_parser, main
from pkd_offline.config import make_config
from pkd_offline.data import file_sha256
from pkd_offline.errors import PkdError
from pkd_offline.models import build_detector
from pkd_offline.models.foreign_weights import load_backbone_weights
from pkd_offline.weights_source import OFFLINE_ENV, cache_dir, expected_hash_prefix, fetch_weights
from stages.evaluate import EvalConfig
from stages.extract import ExtractConfig
from pkd_offline.teachers import load_teacher
from stages.train import TrainConfig
from stages.verify import VerifyConfig, verify
from storage import open_store

PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture(autouse=True)
def torch_home(tmp_path, monkeypatch) -> Path:
    """A fresh torch.hub cache per test; online unless a test says otherwise; loopback never proxied."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(OFFLINE_ENV, "0")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    for name in PROXIES:
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "torch"


def hashed_copy(path: Path, stem: str) -> Path:
    """``path`` renamed to ``<stem>-<first 8 hex digits of its sha256>.pt``, torch.hub's convention."""
    return path.rename(path.with_name(f"{stem}-{file_sha256(path)[:8]}.pt"))


def tiny_teacher(path: Path, seed: int) -> Path:
    """A project checkpoint of the tiny Swin teacher (what `pkd-offline train --student swin` writes)."""
    torch.manual_seed(seed)
    model = build_detector("swin", num_classes=7, variant="tiny")
    save_checkpoint(path, {"spec": model.spec, "model": model.state_dict()})
    return path


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    return hashed_copy(tiny_teacher(tmp_path_factory.mktemp("weights") / "teacher.pt", seed=0), "teacher")


@pytest.fixture(scope="module")
def other_teacher_bytes(tmp_path_factory) -> bytes:
    return tiny_teacher(tmp_path_factory.mktemp("other") / "other.pt", seed=1).read_bytes()


class Handler(http.server.BaseHTTPRequestHandler):
    """GET serves ``server.files[path]`` with its Content-Length; under ``/drop/`` only the first half
    is sent and the connection closed, as a dropped download looks to the client."""

    def do_GET(self) -> None:  # noqa: N802 - the standard library's name
        self.server.requests.append(self.path)
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path.startswith("/drop/"):
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class Server:
    """A ThreadingHTTPServer on 127.0.0.1 (port 0) in a thread; ``files`` maps URL paths to bytes."""

    def __init__(self) -> None:
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.files, self.http.requests = {}, []
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()
        self.running = True

    @property
    def requests(self) -> list[str]:
        return self.http.requests

    def serve(self, path: str, body: bytes) -> str:
        self.http.files[path] = body
        return f"http://127.0.0.1:{self.http.server_address[1]}{path}"

    def stop(self) -> None:
        if self.running:
            self.http.shutdown()
            self.http.server_close()
            self.thread.join()
            self.running = False


@pytest.fixture
def server():
    running = Server()
    yield running
    running.stop()


def extract_args(data: Path, out: Path, checkpoint: str, *extra: str) -> list[str]:
    return ["extract", "--teacher", "swin", "--checkpoint", checkpoint, "--data", str(data), "--split", "train",
            "--out", str(out), "--views", "1", "--short-side", "128", "--max-size", "128", "--batch-size", "4",
            "--workers", "0", "--no-progress", *extra]


def cache_entries() -> list[str]:
    """Every file in the cache directory, temporary ones included."""
    return sorted(p.name for p in cache_dir().iterdir()) if cache_dir().is_dir() else []


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pkd-offline: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_first_run_downloads_then_the_cache_serves_with_the_server_stopped(synth_data, tmp_path, server, teacher_file,
                                                                            torch_home):
    url = server.serve(f"/weights/{teacher_file.name}", teacher_file.read_bytes())
    assert main(extract_args(synth_data, tmp_path / "first.zarr", url)) == 0
    cached = torch_home / "hub" / "checkpoints" / teacher_file.name
    assert cached.read_bytes() == teacher_file.read_bytes()
    assert cache_entries() == [teacher_file.name], "no temporary file may remain"
    assert server.requests == [f"/weights/{teacher_file.name}"]
    teacher = open_store(str(tmp_path / "first.zarr")).manifest.teacher
    assert teacher["checkpoint_url"] == url and teacher["checkpoint_format"] == "pkd-offline"
    assert teacher["checkpoint_sha256"] == file_sha256(teacher_file)  # the full digest, not the name's prefix
    report = verify(VerifyConfig(store=str(tmp_path / "first.zarr"), data=synth_data, checkpoint=teacher_file,
                                 samples=2, progress=False))
    assert report["ok"], "a local copy of the URL's file verifies the store"

    server.stop()
    assert main(extract_args(synth_data, tmp_path / "second.zarr", url, "--offline")) == 0
    assert open_store(str(tmp_path / "second.zarr")).manifest.teacher == teacher
    assert server.requests == [f"/weights/{teacher_file.name}"]


def test_tampered_file_behind_a_hashed_name_is_refused_by_the_cli(synth_data, tmp_path, server, teacher_file,
                                                                   other_teacher_bytes):
    url = server.serve(f"/weights/{teacher_file.name}", other_teacher_bytes)
    result = subprocess.run([sys.executable, "-m", "pkd_offline", *extract_args(synth_data, tmp_path / "f.zarr", url)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    line = one_error_line(result.stderr)
    expected, actual = teacher_file.stem.split("-")[1], hashlib.sha256(other_teacher_bytes).hexdigest()
    assert "sha256 mismatch" in line and f"expects {expected}" in line and actual in line, line
    assert cache_entries() == [] and not (tmp_path / "f.zarr").exists()


def test_tampered_cached_file_is_refused_without_asking_the_server(server, teacher_file, other_teacher_bytes):
    url = server.serve(f"/weights/{teacher_file.name}", teacher_file.read_bytes())
    cache_dir().mkdir(parents=True)
    (cache_dir() / teacher_file.name).write_bytes(other_teacher_bytes)
    with pytest.raises(PkdError, match=r"sha256 mismatch \(cached file .*expects " + teacher_file.stem.split("-")[1]):
        load_teacher("swin", checkpoint=url, random_init=False, variant="tiny", num_classes=7)
    assert server.requests == []


@pytest.mark.parametrize("name", ["teacher.pt", "hashed"])
def test_dropped_connection_leaves_no_cache_entry_and_a_clear_error(synth_data, tmp_path, server, teacher_file, capsys,
                                                                     name):
    name = teacher_file.name if name == "hashed" else name  # without a hash only the length shows the loss
    url = server.serve(f"/drop/{name}", teacher_file.read_bytes())
    assert main(extract_args(synth_data, tmp_path / "f.zarr", url)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"download of {url} ended after {teacher_file.stat().st_size // 2} of {teacher_file.stat().st_size} bytes" \
        in line and "nothing was cached" in line, line
    assert server.requests == [f"/drop/{name}"]
    assert cache_entries() == [], "neither the final nor a temporary file may remain"


def test_offline_flag_and_variable_never_touch_the_network(synth_data, tmp_path, server, teacher_file, capsys,
                                                           monkeypatch):
    url = server.serve(f"/weights/{teacher_file.name}", teacher_file.read_bytes())
    assert main(extract_args(synth_data, tmp_path / "f.zarr", url, "--offline")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "not in the cache" in line and str(cache_dir() / teacher_file.name) in line and "offline" in line, line
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(PkdError, match="not in the cache"):
        fetch_weights(url)
    assert server.requests == [] and cache_entries() == []


def test_missing_url_is_one_clear_error(server):
    url = server.serve("/weights/present.pt", b"")
    with pytest.raises(PkdError, match=r"cannot download .*/weights/absent-0123abcd\.pt: HTTP 404"):
        fetch_weights(url.replace("present.pt", "absent-0123abcd.pt"))
    assert cache_entries() == []


@pytest.mark.parametrize("name,prefix", [
    ("mask_rcnn_swin-s-p4-w7_fpn_fp16_ms-crop-3x_coco_20210903_104808-b92c91f1.pth", "b92c91f1"),
    ("resnet50-0676ba61.pth", "0676ba61"), ("weights-0123456789abcdef.tar.gz", "0123456789abcdef"),
    ("model.pt", None), ("swin-s-p4.pth", None), ("run-1234567.pt", None),
])
def test_hash_prefix_is_read_from_the_names_the_ecosystem_publishes(name, prefix):
    assert expected_hash_prefix(name) == prefix


def test_file_url_is_checked_but_a_plain_path_is_the_users_own(tmp_path, other_teacher_bytes):
    local = tmp_path / "teacher-0000beef.pt"
    local.write_bytes(other_teacher_bytes)
    with pytest.raises(PkdError, match=r"sha256 mismatch \(local file\).*expects 0000beef"):
        fetch_weights(local.as_uri())
    assert fetch_weights(str(local)) == local and cache_entries() == []


def test_backbone_weights_by_http_and_file_url_and_in_params(tmp_path, server):
    torch.manual_seed(5)
    source = build_detector("retinanet", num_classes=3, variant="tiny", backbone="resnet18")
    torch.save(source.detector.backbone.body.state_dict(), tmp_path / "resnet18.pth")  # torchvision ResNet keys
    weights = hashed_copy(tmp_path / "resnet18.pth", "resnet18")
    url = server.serve(f"/models/{weights.name}", weights.read_bytes())
    for name in (url, weights.as_uri()):
        torch.manual_seed(6)
        student = build_detector("retinanet", num_classes=3, variant="tiny", backbone="resnet18")
        load_backbone_weights(student, name)
        assert torch.equal(student.detector.backbone.body.layer2[0].conv1.weight,
                           source.detector.backbone.body.layer2[0].conv1.weight)
    assert cache_entries() == [weights.name] and server.requests == [f"/models/{weights.name}"]
    config = make_config(TrainConfig, {"backbone_weights": url}, {})  # a params file's setting
    assert config.backbone_weights == url


@pytest.mark.parametrize("argv,config_class,field", [
    (["extract", "--checkpoint"], ExtractConfig, "checkpoint"),
    (["train", "--backbone-weights"], TrainConfig, "backbone_weights"),
    (["train", "--checkpoint"], TrainConfig, "teacher_checkpoint"),
    (["eval", "--checkpoint"], EvalConfig, "checkpoint"),
    (["verify", "store.zarr", "--checkpoint"], VerifyConfig, "checkpoint"),
])
def test_every_weights_flag_keeps_a_url_whole(argv, config_class, field):
    url = "s3://bucket/weights/resnet50-0676ba61.pth"  # a Path would fold "//" into "/"
    args = build_parser().parse_args([*argv, url])
    assert getattr(make_config(config_class, {}, vars(args)), field) == url


# --- s3:// against moto on the loopback interface (tests/loopback_s3.py) -----------

BUCKET = "pkd-weights"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An empty bucket on a moto server at 127.0.0.1, reached only through the standard AWS environment."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from loopback_s3 import loopback_s3

    with loopback_s3(BUCKET, tmp_path_factory.mktemp("aws")) as fs:
        yield fs


def test_s3_checkpoint_is_fetched_checked_and_recorded(s3, tmp_path, teacher_file, other_teacher_bytes):
    url = f"s3://{BUCKET}/teachers/{teacher_file.name}"
    s3.put(str(teacher_file), url)
    _, identity = load_teacher("swin", checkpoint=url, random_init=False, variant="tiny", num_classes=7)
    assert identity["checkpoint_url"] == url and identity["checkpoint_sha256"] == file_sha256(teacher_file)
    assert (cache_dir() / teacher_file.name).read_bytes() == teacher_file.read_bytes()

    tampered = tmp_path / "teacher-0000beef.pt"
    tampered.write_bytes(other_teacher_bytes)
    s3.put(str(tampered), f"s3://{BUCKET}/teachers/{tampered.name}")
    with pytest.raises(PkdError, match=r"sha256 mismatch \(download\).*expects 0000beef"):
        fetch_weights(f"s3://{BUCKET}/teachers/{tampered.name}")
    with pytest.raises(PkdError, match="no such object"):
        fetch_weights(f"s3://{BUCKET}/teachers/absent.pt")
    assert cache_entries() == [teacher_file.name]
