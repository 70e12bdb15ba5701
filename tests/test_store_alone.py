"""Training from a WebDataset store alone (``extract --with-images``, no ``--data``): the data directory moved
away after extraction, the same losses as training from the directory, resume, and the one-line refusals."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from pkd_offline.checkpoint import load_checkpoint
from pkd_offline.cli import main
from pkd_offline.data import CocoDetection
from pkd_offline.errors import PkdError
from stages.extract import ExtractConfig, extract
from pkd_offline.store_data import StoreStream, store_dataset, store_views
from stages.train import TrainConfig, train
from storage import Manifest, StoreError, open_store

SMALL = dict(student="retinanet", backbone="resnet18", variant="tiny", short_side=128, max_size=128, batch_size=4,
             workers=0, progress=False, optimizer="adamw", lr=1e-3, warmup_iters=1, val_split=None, iters=3)


def extract_store(data, out, **overrides):
    settings = dict(teacher="swin", random_init=True, variant="tiny", data=data, out=out, views=2, short_side=128,
                    max_size=128, batch_size=4, workers=0, samples_per_shard=3, progress=False, with_images=True)
    return extract(ExtractConfig(**{**settings, **overrides}))


def log_of(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def alone(synth_data, tmp_path_factory):
    """A --with-images store (2 views: plain and flipped), a directory run on it, then the data moved away."""
    root = tmp_path_factory.mktemp("alone")
    data = root / "data"
    shutil.copytree(synth_data, data)
    store = extract_store(data, root / "wds")
    reference = CocoDetection(data, "train", store_views(store))
    items = {(image_index, view): reference[(image_index, view)]
             for image_index in range(len(reference)) for view in (0, 1)}
    train(TrainConfig(data=data, features=store, out=root / "from_dir", **SMALL))
    shutil.move(data, root / "moved")
    categories = [{"id": c, "name": reference.coco.cats[c]["name"]} for c in reference.category_ids]
    return {"store": store, "items": items, "root": root, "categories": categories}


def test_store_items_equal_the_directory_items_on_every_view_flipped_too(alone):
    store = open_store(str(alone["store"]))
    assert store.manifest.categories == alone["categories"] and len(alone["categories"]) == 6
    dataset = store_dataset(alone["store"], store_views(alone["store"]), "retinanet")
    assert dataset.category_ids == [c["id"] for c in alone["categories"]] and dataset.num_classes == 7
    seen = set()
    for sample in store.iter_samples(range(store.manifest.n_shards)):
        image_index = dataset.image_ids.index(sample.image_id)
        mine, theirs = dataset.item(image_index, sample), alone["items"][(image_index, sample.view_index)]
        assert torch.equal(mine["image"], theirs["image"]), (sample.image_id, sample.view_index)
        for key in ("boxes", "labels", "image_id"):
            assert torch.equal(mine["target"][key], theirs["target"][key]), key
        assert (mine["image_hw"], mine["original_hw"]) == (theirs["image_hw"], theirs["original_hw"])
        seen.add(sample.view_index)
    assert seen == {0, 1} and store.manifest.views[1]["flip"]


def test_training_from_the_store_alone_equals_training_from_the_directory(alone):
    assert not (alone["root"] / "data").exists()
    out = alone["root"] / "alone"
    path = train(TrainConfig(features=alone["store"], out=out, **SMALL))
    assert path == out / "model.pt"
    expected = log_of(alone["root"] / "from_dir")
    got = log_of(out)
    assert len(got) == 3 and all(r["loss_pkd"] > 0 for r in got)
    for key in ("loss", "loss_det", "loss_pkd", "lr"):
        assert [r[key] for r in got] == [r[key] for r in expected], key


def test_resume_from_the_store_alone_gives_the_same_losses(alone):
    out = alone["root"] / "resumed"
    train(TrainConfig(features=alone["store"], out=out, stop_after=1, **SMALL))
    assert not (out / "model.pt").exists()
    train(TrainConfig(features=alone["store"], out=out, resume=True, stop_after=1, **SMALL))
    last = load_checkpoint(out / "last.pt")  # continued from step 1 to the end of epoch 0 (8 images, 2 steps)
    assert (last["iteration"], last["epoch"], last["step_in_epoch"]) == (2, 0, 2)
    train(TrainConfig(features=alone["store"], out=out, resume=True, **SMALL))
    again = log_of(out)
    assert [r["iter"] for r in again] == [1, 2, 3] and [r["epoch"] for r in again] == [0, 0, 1]
    assert [r["loss"] for r in again] == [r["loss"] for r in log_of(alone["root"] / "from_dir")]


def test_the_stream_from_the_store_alone_yields_every_image_once(alone):
    dataset = store_dataset(alone["store"], store_views(alone["store"]), "retinanet")
    items = list(StoreStream(dataset, alone["store"], seed=1, shuffle_buffer=4))
    assert sorted(item["image_id"] for item in items) == sorted(dataset.image_ids)
    assert all("teacher_features" in item for item in items)


def test_a_store_without_images_is_refused_in_one_line_naming_with_images(synth_data, tmp_path, capsys):
    store = extract_store(synth_data, tmp_path / "plain", with_images=False)
    with pytest.raises(PkdError, match=r"no images and targets .*--with-images"):
        train(TrainConfig(features=store, out=tmp_path / "run", **SMALL))
    capsys.readouterr()  # (extraction's own report)
    code = main(["train", "--features", str(store), "--out", str(tmp_path / "cli"), "--student", "retinanet",
                 "--variant", "tiny", "--iters", "1", "--workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--with-images" in err[0] and "Traceback" not in err[0]


def test_zarr_store_mask_student_and_eval_without_data_are_refused(synth_data, alone, tmp_path):
    zarr_store = extract_store(synth_data, tmp_path / "f.zarr")
    with pytest.raises(PkdError, match=r"is zarr: .*WebDataset"):
        train(TrainConfig(features=zarr_store, out=tmp_path / "z", **SMALL))
    with pytest.raises(PkdError, match=r"maskrcnn needs instance masks.*--data DIR"):
        train(TrainConfig(**{**SMALL, "student": "maskrcnn"}, features=alone["store"], out=tmp_path / "m"))
    with pytest.raises(PkdError, match=r"--eval-every reads a val set: pass --val-store STORE .* or --data DIR"):
        train(TrainConfig(**{**SMALL, "val_split": "val"}, eval_every=1, features=alone["store"], out=tmp_path / "e"))
    with pytest.raises(PkdError, match=r"--data DIR is needed"):
        train(TrainConfig(out=tmp_path / "n", **SMALL))


def test_manifest_categories_are_optional_and_strictly_checked(alone, tmp_path):
    text = (alone["store"] / "manifest.json").read_text()
    raw = json.loads(text)
    assert Manifest.from_json(text).categories == raw["categories"]
    old = {k: v for k, v in raw.items() if k != "categories"}  # written before categories were recorded
    manifest = Manifest.from_json(json.dumps(old))
    assert manifest.categories is None and manifest.compatible_with(Manifest.from_json(text)) == []
    for bad in ([{"id": 1}], [{"id": "1", "name": "a"}], [{"id": 2, "name": "a"}, {"id": 1, "name": "b"}],
                [{"id": 1, "name": "a"}, {"id": 1, "name": "a"}], {"1": "a"}):
        with pytest.raises(StoreError, match="categories|category ids"):
            Manifest.from_json(json.dumps({**raw, "categories": bad}))
    # An old store (no categories) with images is refused for training alone, naming the fix.
    old_store = tmp_path / "old"
    shutil.copytree(alone["store"], old_store)
    (old_store / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(PkdError, match=r"records no categories.*--with-images"):
        store_dataset(old_store, store_views(old_store), "retinanet")


S3_AVAILABLE = all(importlib.util.find_spec(name) for name in ("s3fs", "moto"))
if S3_AVAILABLE:
    from test_remote_store import BUCKET, s3  # noqa: F401 - the loopback S3 server fixture


@pytest.mark.skipif(not S3_AVAILABLE, reason="needs s3fs and moto")
def test_training_and_resume_from_a_store_alone_on_s3(s3, synth_data, alone):  # noqa: F811
    url = f"s3://{BUCKET}/alone/shards/"
    extract_store(synth_data, url)
    assert s3.isfile(f"{url}manifest.json")
    out = alone["root"] / "s3"
    train(TrainConfig(features=url, out=out, stop_after=1, **SMALL))
    train(TrainConfig(features=url, out=out, resume=True, stop_after=1, **SMALL))
    assert load_checkpoint(out / "last.pt")["iteration"] == 2  # continued, not restarted
    train(TrainConfig(features=url, out=out, resume=True, **SMALL))
    expected = log_of(alone["root"] / "from_dir")
    got = log_of(out)
    assert [r["iter"] for r in got] == [1, 2, 3]
    for key in ("loss", "loss_det", "loss_pkd"):
        assert [r[key] for r in got] == [r[key] for r in expected], key
