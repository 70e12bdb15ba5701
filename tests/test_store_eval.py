"""Evaluation from a val store (``extract --split val --with-images``) instead of the data directory: the ground
truth rebuilt from the store equals the annotation file's, `eval --store` equals `eval --data` on the same
checkpoint, training evaluates on a val store, and the one-line refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pkd_offline.checkpoint import load_checkpoint, load_detector, save_checkpoint
from pkd_offline.cli import main
from pkd_offline.data import CocoDetection, annotation_path
from pkd_offline.errors import PkdError
from pkd_offline.evaluate import coco_box_ap, predict
from stages.evaluate import (EvalConfig, StoreTruth, StoreValSet, evaluate, ground_truth, open_val_set,
                             predict_store)
from pkd_offline.store_data import store_views
from stages.train import TrainConfig, train

from test_store_alone import SMALL, extract_store


def box_area_data(synth_data, root):
    """A copy of the synthetic set whose val areas are the boxes' (a store holds boxes, not segment areas)."""
    data = root / "data"
    shutil.copytree(synth_data, data)
    path = annotation_path(data, "val")
    content = json.loads(path.read_text())
    assert not any(a["iscrowd"] for a in content["annotations"])  # (a store holds no crowd regions either)
    for annotation in content["annotations"]:
        annotation["area"] = annotation["bbox"][2] * annotation["bbox"][3]
    path.write_text(json.dumps(content))
    return data


@pytest.fixture(scope="module")
def val(synth_data, tmp_path_factory):
    """Box-area data, a val store of it (2 views: plain and flipped), a train store and a checkpoint trained on it."""
    root = tmp_path_factory.mktemp("val")
    data = box_area_data(synth_data, root)
    val_store = extract_store(data, root / "val_wds", split="val", samples_per_shard=2)
    train_store = extract_store(data, root / "train_wds")
    checkpoint = train(TrainConfig(data=data, features=train_store, out=root / "run", **{**SMALL, "iters": 1}))
    # One step leaves RetinaNet's prior (scores near 0.01, under its 0.05 threshold): raise the class bias so
    # that the checkpoint detects, and the evaluations compare detections, not two empty lists.
    content = load_checkpoint(checkpoint)
    content["model"]["detector.head.classification_head.cls_logits.bias"] += 4.0
    save_checkpoint(checkpoint, content)
    return {"root": root, "data": data, "val_store": val_store, "train_store": train_store, "checkpoint": checkpoint,
            "views": store_views(val_store)}


def oracle_results(dataset: CocoDetection, seed: int) -> list[dict]:
    """Detections near every ground-truth box (jittered by up to 3 px) and as many random boxes, random scores:
    a result list whose AP is neither 0 nor 1, so a ground truth off by a box or a pixel changes it."""
    rng = np.random.default_rng(seed)
    results = []
    for annotation in dataset.coco.dataset["annotations"]:
        x, y, w, h = annotation["bbox"]
        jitter = rng.uniform(-3, 3, 4)
        results.append({"image_id": annotation["image_id"], "category_id": annotation["category_id"],
                        "bbox": [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]],
                        "score": float(rng.uniform(0.2, 1))})
        results.append({"image_id": annotation["image_id"], "category_id": int(rng.choice(dataset.category_ids)),
                        "bbox": [float(v) for v in rng.uniform(0, 60, 4)], "score": float(rng.uniform(0, 0.8))})
    return results


def store_truth(store, view) -> StoreTruth:
    val_set = StoreValSet(store, view)
    records = [ground_truth(item, view, val_set.category_ids) for item in val_set]
    return StoreTruth.from_records(val_set.categories, records)


@pytest.mark.parametrize("view_index", [0, 1], ids=["plain", "flipped"])
def test_ground_truth_from_the_store_equals_the_annotation_file(val, view_index):
    view = val["views"][view_index]
    assert view.flip == bool(view_index)
    directory = CocoDetection(val["data"], "val", [view])
    truth = store_truth(val["val_store"], view)
    assert truth.image_ids == directory.image_ids
    for image_id in directory.image_ids:
        want = sorted((a["category_id"], a["bbox"], a["area"]) for a in directory.coco.imgToAnns[image_id])
        got = sorted((a["category_id"], a["bbox"], a["area"]) for a in truth.coco.imgToAnns[image_id])
        assert [c for c, _, _ in got] == [c for c, _, _ in want]
        np.testing.assert_allclose([b for _, b, _ in got], [b for _, b, _ in want], atol=1e-4)
        np.testing.assert_allclose([a for _, _, a in got], [a for _, _, a in want], rtol=1e-5)
        assert truth.coco.imgs[image_id]["height"] == directory.coco.imgs[image_id]["height"]
    results = oracle_results(directory, seed=view_index)
    want, got = coco_box_ap(directory, results), coco_box_ap(truth, results)
    assert 0.2 < want["mAP"] < 0.95 and min(want["APs"], want["APm"]) >= 0  # (no large boxes: APl is -1)
    assert got == pytest.approx(want, abs=1e-12)


def test_segment_areas_change_only_the_size_split(synth_data, val):
    """On the original synthetic set (areas of the polygons, not the boxes) mAP, AP50 and AP75 still agree."""
    directory = CocoDetection(synth_data, "val", val["views"][:1])
    results = oracle_results(directory, seed=5)
    want, got = coco_box_ap(directory, results), coco_box_ap(store_truth(val["val_store"], val["views"][0]), results)
    assert {k: got[k] for k in ("mAP", "AP50", "AP75")} == pytest.approx({k: want[k] for k in ("mAP", "AP50", "AP75")},
                                                                         abs=1e-12)


def test_eval_from_a_val_store_equals_eval_from_the_directory(val, capsys):
    # Batches of 2 in the same order (the store's shards hold the images in the annotation file's order): a batch
    # pads its images to a common size, and padding changes a detector's output.
    from_store = evaluate(EvalConfig(checkpoint=val["checkpoint"], store=str(val["val_store"]), progress=False,
                                     batch_size=2))
    from_directory = evaluate(EvalConfig(checkpoint=val["checkpoint"], data=val["data"], progress=False, batch_size=2))
    assert from_store == pytest.approx(from_directory, abs=1e-12)
    assert from_directory["mAP"] > 0
    # The same detections, image by image (the stored file decoded and replayed as the directory's).
    model, _ = load_detector(val["checkpoint"])
    val_set = StoreValSet(val["val_store"], val["views"][0])
    results, records = predict_store(model, val_set, torch.device("cpu"), batch_size=2, progress=False)
    directory = predict(model, CocoDetection(val["data"], "val", val["views"][:1]), torch.device("cpu"), batch_size=2,
                        progress=False)
    assert len(results) >= 4 and len(records) == 4

    def key(r):
        return r["image_id"], r["category_id"], -r["score"], r["bbox"]

    assert sorted(results, key=key) == sorted(directory, key=key)
    # Two DataLoader workers stream disjoint shards: every image once (batches of 1: the same detections).
    one_by_one = predict(model, CocoDetection(val["data"], "val", val["views"][:1]), torch.device("cpu"), batch_size=1,
                         progress=False)
    results, records = predict_store(model, val_set, torch.device("cpu"), batch_size=1, workers=2, progress=False)
    assert sorted(r["image"]["id"] for r in records) == sorted(val_set.images.image_ids)
    assert sorted(results, key=key) == sorted(one_by_one, key=key)
    assert main(["eval", "--checkpoint", str(val["checkpoint"]), "--store", str(val["val_store"]), "--json",
                 "--batch-size", "2", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(from_directory, abs=1e-12)


def truth_boxes(truth) -> tuple[list[tuple[int, int]], np.ndarray]:
    """A ground truth's (image id, category id) per annotation and its boxes (x, y, w, h px), in one sorted order."""
    rows = sorted((a["image_id"], a["category_id"], *a["bbox"]) for a in truth.coco.dataset["annotations"])
    return [row[:2] for row in rows], np.array([row[2:] for row in rows])


def test_training_from_the_store_alone_evaluates_on_the_val_store(val, monkeypatch):
    """Two runs resumed from one checkpoint that detects (its class bias raised, as in the fixture) evaluate during
    training, one on the data directory, one on the val store: the same detections against the same ground truth,
    so the same non-zero AP, at every evaluation."""
    evaluations = {}

    def recording_box_ap(truth, results):  # the real evaluation, its inputs kept for the comparison below
        evaluations.setdefault(type(truth).__name__, []).append((truth, results))
        return coco_box_ap(truth, results)

    monkeypatch.setattr("stages.train.coco_box_ap", recording_box_ap)  # the directory's val set
    monkeypatch.setattr("stages.evaluate.coco_box_ap", recording_box_ap)  # a val store's
    settings = {**SMALL, "iters": 3, "val_split": "val", "checkpoint_every": 1}
    start = val["root"] / "resume_from"
    train(TrainConfig(data=val["data"], features=val["train_store"], out=start, stop_after=1, **settings))
    content = load_checkpoint(start / "last.pt")
    content["model"]["detector.head.classification_head.cls_logits.bias"] += 4.0
    save_checkpoint(start / "last.pt", content)
    for name in ("dir_eval", "store_eval"):
        shutil.copytree(start, val["root"] / name)
    train(TrainConfig(data=val["data"], features=val["train_store"], out=val["root"] / "dir_eval", resume=True,
                      eval_every=1, **settings))
    train(TrainConfig(features=val["train_store"], val_store=str(val["val_store"]), out=val["root"] / "store_eval",
                      resume=True, eval_every=1, **settings))
    want = [json.loads(line) for line in (val["root"] / "dir_eval" / "eval.jsonl").read_text().splitlines()]
    got = [json.loads(line) for line in (val["root"] / "store_eval" / "eval.jsonl").read_text().splitlines()]
    assert [e["iter"] for e in got] == [e["iter"] for e in want] == [2, 3]
    assert all(e["mAP"] > 0 for e in want)
    for got_eval, want_eval in zip(got, want):
        assert got_eval == pytest.approx(want_eval, abs=1e-12)
    assert len(evaluations["CocoDetection"]) == len(evaluations["StoreTruth"]) == 2

    def key(r):
        return r["image_id"], r["category_id"], -r["score"], r["bbox"]

    for (directory, want_results), (store, got_results) in zip(evaluations["CocoDetection"], evaluations["StoreTruth"]):
        assert len(want_results) > 0 and sorted(got_results, key=key) == sorted(want_results, key=key)
        (got_ids, got_boxes), (want_ids, want_boxes) = truth_boxes(store), truth_boxes(directory)
        assert got_ids == want_ids and len(want_ids) > 0
        np.testing.assert_allclose(got_boxes, want_boxes, atol=1e-4)


def test_val_stores_that_cannot_serve_are_refused_in_one_line(val, synth_data, tmp_path, capsys):
    plain = extract_store(val["data"], tmp_path / "plain", split="val", with_images=False)
    zarr_store = extract_store(val["data"], tmp_path / "f.zarr", split="val")
    other_view = extract_store(val["data"], tmp_path / "other", split="val", short_side=96, max_size=96, views=1)
    view = val["views"][0]
    with pytest.raises(PkdError, match=r"holds no images and targets .*--with-images"):
        StoreValSet(plain, view)
    with pytest.raises(PkdError, match=r"is zarr: .*WebDataset"):
        StoreValSet(zarr_store, view)
    with pytest.raises(PkdError, match=r"not the view the model is evaluated at.*--short-side 128 --max-size 128"):
        StoreValSet(other_view, view)
    categories = StoreValSet(val["val_store"], view).category_ids
    with pytest.raises(PkdError, match=r"model.pt was trained on categories \[1, 2\], the val set val store .* has"):
        open_val_set(None, "val", val["val_store"], view, [1, 2], model_name="model.pt")
    assert open_val_set(None, "val", val["val_store"], view, categories).category_ids == categories
    with pytest.raises(PkdError, match=r"--eval-every reads a val set: pass --val-store"):
        train(TrainConfig(**{**SMALL, "val_split": "val"}, eval_every=1, features=val["train_store"],
                          out=tmp_path / "e"))
    capsys.readouterr()  # (extraction's own report)
    code = main(["eval", "--checkpoint", str(val["checkpoint"]), "--store", str(plain)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--with-images" in err[0]
