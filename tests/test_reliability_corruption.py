"""Damaged stores and hostile files: every case is refused with one line naming the shard (and sample), never a
traceback, never a silently wrong value, never unpickled code.

Stores here are real extractions (tiny Swin teacher, 8 synthetic images at 64 px, one view, 2 samples per
shard = 4 shards), made once per module and copied before each damage.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pkd_offline.checkpoint import load_checkpoint
from pkd_offline.errors import PkdError
from stages.extract import ExtractConfig, extract
from storage import StoreError, open_store

STORE_NAMES = {"zarr": "f.zarr", "wds": "f"}
TRAIN_FLAGS = ["--student", "retinanet", "--backbone", "resnet18", "--variant", "tiny", "--short-side", "64",
               "--max-size", "64", "--batch-size", "4", "--workers", "0", "--optimizer", "adamw", "--lr", "1e-3",
               "--warmup-iters", "1", "--val-split", "", "--no-progress"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pkd_offline", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pkd-offline: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def clean_stores(synth_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clean")
    return {fmt: extract(ExtractConfig(teacher="swin", random_init=True, variant="tiny", data=synth_data, out=root / name,
                                       views=1, short_side=64, max_size=64, batch_size=4, workers=0,
                                       samples_per_shard=2, progress=False))
            for fmt, name in STORE_NAMES.items()}


def copy_store(clean_stores, fmt: str, tmp_path: Path) -> Path:
    path = tmp_path / STORE_NAMES[fmt]
    shutil.copytree(clean_stores[fmt], path)
    return path


def payload_offset(path: Path, fmt: str, sample: int) -> tuple[Path, int]:
    """A file of shard 1 and a byte offset inside the stored data of ``sample`` (a feature chunk, not padding)."""
    if fmt == "wds":
        with tarfile.open(path / "shard-000001.tar") as tar:
            member = next(m for m in tar.getmembers() if m.name == f"{sample:09d}.s8.values.npy.zst")
        return path / "shard-000001.tar", member.offset_data + member.size // 2
    # zarr sharding: chunks (one per sample) first, in order, then the index; sample 3 is the shard's second chunk.
    victim = path / "s8" / "values" / "c" / "1" / "0" / "0" / "0"
    return victim, int(os.path.getsize(victim) * 0.75)


def flip(path: Path, offset: int) -> None:
    content = bytearray(path.read_bytes())
    content[offset] ^= 0x10
    path.write_bytes(bytes(content))


# Damage that leaves the manifest readable: (name, function(store path, fmt) -> the shard it damaged).
def truncate_shard(path: Path, fmt: str) -> int:
    victim = path / "shard-000001.tar" if fmt == "wds" else path / "s16" / "values" / "c" / "1" / "0" / "0" / "0"
    os.truncate(victim, os.path.getsize(victim) // 2)
    return 1


def flip_shard(path: Path, fmt: str) -> int:
    flip(*payload_offset(path, fmt, sample=3))
    return 1


def delete_shard_file(path: Path, fmt: str) -> int:
    (path / "shard-000002.tar" if fmt == "wds" else path / "s8" / "values" / "c" / "2" / "0" / "0" / "0").unlink()
    return 2


DAMAGE = {"truncated": truncate_shard, "bit-flipped": flip_shard, "missing-file": delete_shard_file}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("fmt", sorted(STORE_NAMES))
def test_damaged_shard_is_found_by_verify_and_refused_by_read(clean_stores, tmp_path, fmt, damage):
    path = copy_store(clean_stores, fmt, tmp_path)
    shard = DAMAGE[damage](path, fmt)
    reader = open_store(str(path))
    problems = reader.verify_shards()
    assert len(problems) == 1 and problems[0].startswith(f"shard {shard}:"), problems
    span = reader.manifest.shard_range(shard)
    failures = []
    for index in span:
        try:
            reader.read(index)
        except StoreError as error:
            failures.append(str(error))
    assert failures, f"{damage} shard {shard} read without error"
    for message in failures:
        assert "sample" in message and (f"shard {shard}" in message or f"shard-{shard:06d}.tar" in message), message
    with pytest.raises(StoreError, match=f"shard-{shard:06d}.tar" if fmt == "wds" else "sample"):
        list(open_store(str(path)).iter_samples([shard]))
    # Undamaged shards still read.
    assert [s.index for s in open_store(str(path)).iter_samples([0])] == [0, 1]


@pytest.mark.parametrize("fmt", sorted(STORE_NAMES))
def test_bit_flip_in_a_feature_chunk_is_a_read_error_not_a_wrong_value(clean_stores, tmp_path, fmt):
    path = copy_store(clean_stores, fmt, tmp_path)
    flip(*payload_offset(path, fmt, sample=3))
    with pytest.raises(StoreError, match="sample 3"):
        open_store(str(path)).read(3)


def lie_samples(manifest: dict) -> str:
    manifest["shards"][2]["samples"] = 3
    return "shard 2 records 3 samples"


def lie_image_ids(manifest: dict) -> str:
    ids = manifest["dataset"]["image_ids"]
    ids[2], ids[3] = ids[3], ids[2]
    return "sample 2"


def lie_drop_image(manifest: dict) -> str:
    manifest["dataset"]["image_ids"].pop()
    return "shard 3 records 2 samples"


def lie_samples_per_shard(manifest: dict) -> str:
    manifest["samples_per_shard"] = 4
    manifest["shards"] = [{**record, "samples": 4} for record in manifest["shards"][:2]]
    return "ends early|samples_per_shard 4"


LIES = {"shard-count": lie_samples, "swapped-ids": lie_image_ids, "dropped-image": lie_drop_image,
        "samples-per-shard": lie_samples_per_shard}


@pytest.mark.parametrize("lie", sorted(LIES))
@pytest.mark.parametrize("fmt", sorted(STORE_NAMES))
def test_manifest_that_lies_about_counts_or_ids_is_refused(clean_stores, tmp_path, fmt, lie):
    path = copy_store(clean_stores, fmt, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    expected = LIES[lie](manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=expected):
        reader = open_store(str(path))
        for _ in reader.iter_samples():
            pass


def test_cli_verify_names_the_damaged_shard(clean_stores, synth_data, tmp_path):
    for fmt, damage in (("wds", "truncated"), ("zarr", "bit-flipped"), ("zarr", "missing-file")):
        path = copy_store(clean_stores, fmt, tmp_path / f"{fmt}-{damage}")
        shard = DAMAGE[damage](path, fmt)
        result = run_cli("verify", path, "--data", synth_data, "--samples", "0", "--no-progress")
        assert result.returncode != 0, result.stdout
        assert "Traceback" not in result.stderr
        assert f"shard {shard}:" in result.stdout, result.stdout


def test_cli_verify_on_a_lying_manifest_is_one_line(clean_stores, synth_data, tmp_path):
    path = copy_store(clean_stores, "zarr", tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    lie_samples(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(run_cli("verify", path, "--data", synth_data), "shard 2 records 3 samples")


@pytest.mark.parametrize("lie,expected", [("swapped-ids", "image ids differ"),
                                          ("shard-count", "shard 2 records 3 samples")])
@pytest.mark.parametrize("fmt", sorted(STORE_NAMES))
def test_training_on_a_manifest_that_lies_stops_with_one_line(clean_stores, synth_data, tmp_path, fmt, lie, expected):
    path = copy_store(clean_stores, fmt, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    LIES[lie](manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("train", *TRAIN_FLAGS, "--data", synth_data, "--out", tmp_path / "run", "--iters", "2",
                     "--features", path)
    assert_one_line_error(result, expected)
    assert not (tmp_path / "run" / "log.jsonl").exists()


@pytest.mark.parametrize("fmt,damage", [("zarr", "bit-flipped"), ("wds", "truncated")])
def test_training_on_a_damaged_store_stops_with_one_line(clean_stores, synth_data, tmp_path, fmt, damage):
    path = copy_store(clean_stores, fmt, tmp_path)
    shard = DAMAGE[damage](path, fmt)
    result = run_cli("train", *TRAIN_FLAGS, "--data", synth_data, "--out", tmp_path / "run", "--iters", "2",
                     "--features", path)
    line = assert_one_line_error(result, "sample")
    assert f"shard {shard}" in line or f"shard-{shard:06d}.tar" in line, line


@pytest.mark.parametrize("fmt,damage", [("zarr", "bit-flipped"), ("wds", "truncated")])
def test_training_can_skip_damaged_samples_and_count_them(clean_stores, synth_data, tmp_path, fmt, damage):
    path = copy_store(clean_stores, fmt, tmp_path)
    shard = DAMAGE[damage](path, fmt)
    run = tmp_path / "run"
    # 8 images in batches of 4: 2 steps is one epoch, so every sample is met once.
    result = run_cli("train", *TRAIN_FLAGS, "--data", synth_data, "--out", run, "--iters", "2",
                     "--features", path, "--on-error", "skip")
    assert result.returncode == 0, result.stderr
    assert len((run / "log.jsonl").read_text().splitlines()) == 2
    skipped = json.loads((run / "skipped.json").read_text())
    # zarr: the one sample whose chunk is flipped; WebDataset: the truncated shard, from its first unreadable sample.
    expected = "sample 3" if fmt == "zarr" else f"shard {shard}"
    assert len(skipped) == 1 and expected in skipped[0]["skipped"], skipped
    if fmt == "zarr":
        assert (skipped[0]["image_id"], skipped[0]["view_index"]) == (open_store(str(path)).manifest.image_ids[3], 0)
    assert f"skipped 1 damaged samples (listed in {run / 'skipped.json'})" in result.stderr
    assert "skipped: " + skipped[0]["skipped"] in result.stderr


# --- safe loading: plant pickles everywhere a reader looks; none may run ---

class Planted:
    """Unpickling this creates the file named by ``marker``: proof that pickled code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_a_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "model.pt"
    torch.save({"spec": {"name": "retinanet"}, "model": {}, "payload": Planted(str(marker))}, checkpoint)
    with pytest.raises(PkdError, match="cannot be loaded safely") as caught:
        load_checkpoint(checkpoint)
    assert "\n" not in str(caught.value)
    assert not marker.exists(), "the pickled object's code ran"
    result = run_cli("eval", "--checkpoint", checkpoint, "--data", tmp_path)
    assert_one_line_error(result, "cannot be loaded safely")
    assert not marker.exists(), "the pickled object's code ran in the CLI"


def rewrite_tar(tar: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(tar, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def tar_members(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as archive:
        return {info.name: archive.extractfile(info).read() for info in archive.getmembers()}


@pytest.mark.parametrize("extension", ["pyd", "pickle", "pkl", "pth", "pt", "PYD"])
def test_wds_pickle_member_is_refused_without_running_it(clean_stores, tmp_path, extension):
    path = copy_store(clean_stores, "wds", tmp_path)
    marker = tmp_path / "pwned"
    import pickle

    members = tar_members(path / "shard-000000.tar")
    members[f"000000000.state.{extension}"] = pickle.dumps(Planted(str(marker)))
    rewrite_tar(path / "shard-000000.tar", dict(sorted(members.items())))
    reader = open_store(str(path))
    with pytest.raises(StoreError, match="pickle"):
        reader.read(0)
    with pytest.raises(StoreError, match="pickle"):
        list(reader.iter_samples([0]))
    assert not marker.exists()


@pytest.mark.parametrize("compressed", [True, False])
def test_npy_member_with_pickled_content_is_refused_without_running_it(clean_stores, tmp_path, compressed):
    from numcodecs import Zstd

    path = copy_store(clean_stores, "wds", tmp_path)
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    np.save(buffer, np.array([Planted(str(marker))], dtype=object), allow_pickle=True)
    members = tar_members(path / "shard-000000.tar")
    del members["000000000.s8.values.npy.zst"]
    if compressed:
        members["000000000.s8.values.npy.zst"] = Zstd(level=3).encode(buffer.getvalue())
    else:
        members["000000000.s8.values.npy"] = buffer.getvalue()
    rewrite_tar(path / "shard-000000.tar", dict(sorted(members.items())))
    with pytest.raises(StoreError, match="not a plain numeric .npy"):
        open_store(str(path)).read(0)
    assert not marker.exists()


def test_npz_archive_in_an_npy_member_is_refused(clean_stores, tmp_path):
    path = copy_store(clean_stores, "wds", tmp_path)
    buffer = io.BytesIO()
    np.savez(buffer, values=np.zeros((64, 2, 2), np.float16))
    members = tar_members(path / "shard-000000.tar")
    members["000000000.s8.values.npy.zst"] = __import__("numcodecs").Zstd(level=3).encode(buffer.getvalue())
    rewrite_tar(path / "shard-000000.tar", members)
    with pytest.raises(StoreError, match="not a plain numeric .npy"):
        open_store(str(path)).read(0)


def test_npy_declaring_a_huge_shape_is_refused_before_allocating(clean_stores, tmp_path):
    path = copy_store(clean_stores, "wds", tmp_path)
    header = np.lib.format.header_data_from_array_1_0(np.zeros(1, np.float16))
    header["shape"] = (64, 10**6, 10**6)
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    buffer.write(b"\0" * 64)
    members = tar_members(path / "shard-000000.tar")
    members["000000000.s8.values.npy.zst"] = __import__("numcodecs").Zstd(level=3).encode(buffer.getvalue())
    rewrite_tar(path / "shard-000000.tar", members)
    with pytest.raises(StoreError, match="not a plain numeric .npy"):
        open_store(str(path)).read(0)


def test_zstd_frame_declaring_more_than_the_manifest_allows_is_refused(clean_stores, tmp_path):
    from numcodecs import Zstd

    path = copy_store(clean_stores, "wds", tmp_path)
    bomb = Zstd(level=19).encode(b"\0" * (64 << 20))  # 64 MiB of zeros: far more than a 64-channel 2x2 map
    members = tar_members(path / "shard-000000.tar")
    members["000000000.s8.values.npy.zst"] = bomb
    rewrite_tar(path / "shard-000000.tar", members)
    with pytest.raises(StoreError, match="zstd frame declares"):
        open_store(str(path)).read(0)


@pytest.mark.parametrize("kind", ["fixed-length string", "variable-length string", "object"])
@pytest.mark.filterwarnings("ignore:.*does not have a Zarr V3 specification")
def test_zarr_array_with_object_or_string_dtype_is_refused(clean_stores, tmp_path, kind):
    from zarr.core.dtype import VariableLengthBytes, VariableLengthUTF8

    path = copy_store(clean_stores, "zarr", tmp_path)
    group = zarr.open_group(str(path), mode="r+")
    shape = group["s8/values"].shape
    del group["s8/values"]
    dtype = {"fixed-length string": "<U4", "variable-length string": VariableLengthUTF8(),
             "object": VariableLengthBytes()}[kind]  # VariableLengthBytes: numpy object dtype (Python bytes objects)
    planted = group.create_array("s8/values", shape=shape, dtype=dtype)
    assert np.dtype(planted.dtype).kind == {"fixed-length string": "U", "variable-length string": "T",
                                            "object": "O"}[kind]
    with pytest.raises(StoreError, match="object and string dtypes are refused"):
        open_store(str(path))


def test_stores_never_unpickle(clean_stores, monkeypatch):
    """The readers never unpickle: every entry point to pickle and to numpy's array loading (np.load,
    read_array) fails while both stores are read in full (random access and streaming), and the reads
    still succeed. (numpy's .npy header parser, which uses ast.literal_eval, stays: the reader uses it.)"""
    import _pickle
    import pickle

    import numpy.lib.format

    def refuse(*args, **kwargs):
        raise AssertionError("a store reader unpickled or np.load-ed something")

    class RefusingUnpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    for module in (pickle, _pickle):
        for name in ("load", "loads"):
            monkeypatch.setattr(module, name, refuse)
        monkeypatch.setattr(module, "Unpickler", RefusingUnpickler)
    monkeypatch.setattr(pickle, "_Unpickler", RefusingUnpickler)
    monkeypatch.setattr(np, "load", refuse)
    monkeypatch.setattr(numpy.lib.format, "read_array", refuse)
    for path in clean_stores.values():
        store = open_store(str(path))
        assert len(list(store.iter_samples())) == 8
        assert [store.read(index).index for index in range(8)] == list(range(8))


# --- bad values ---

def test_non_finite_loss_stops_naming_step_and_images_and_keeps_the_checkpoint(synth_data, tmp_path):
    run = tmp_path / "run"
    # A learning rate of 1e30 makes every weight explode after the first update: the next loss is not finite.
    result = run_cli("train", *TRAIN_FLAGS, "--data", synth_data, "--out", run, "--iters", "4", "--lr", "1e30",
                     "--checkpoint-every", "1")
    line = assert_one_line_error(result, "non-finite loss at step", "images [", "checkpoint is kept")
    step = int(line.split("non-finite loss at step ")[1].split()[0])
    logged = [json.loads(record)["iter"] for record in (run / "log.jsonl").read_text().splitlines()]
    # Steps count from 1 as in log.jsonl: the failing step is the one after the last logged (and checkpointed) one.
    assert logged == list(range(1, step)) and step >= 2
    assert load_checkpoint(run / "last.pt")["iteration"] == step - 1
    assert not (run / "model.pt").exists()


def test_nan_teacher_features_refuse_to_write_and_name_the_image(synth_data, tmp_path):
    from pkd_offline.checkpoint import save_checkpoint
    from pkd_offline.teachers import load_teacher

    model, _ = load_teacher("swin", checkpoint=None, random_init=True, variant="tiny", num_classes=7)
    state = model.state_dict()
    state["detector.backbone.fpn.layer_blocks.0.0.bias"][0] = float("nan")
    save_checkpoint(tmp_path / "nan.pt", {"spec": model.spec, "model": state})
    out = tmp_path / "f.zarr"
    result = run_cli("extract", "--teacher", "swin", "--checkpoint", tmp_path / "nan.pt", "--variant", "tiny",
                     "--data", synth_data, "--out", out, "--short-side", "64", "--max-size", "64", "--workers", "0",
                     "--no-progress")
    assert_one_line_error(result, "teacher features of image", "NaN or Inf", "nothing was written")
    assert not list((out / "shards").glob("*.json")) if (out / "shards").exists() else True
    with pytest.raises(StoreError, match="unfinished"):
        open_store(str(out))
