import json
import shutil

import pytest
import torch

from pkd_offline.checkpoint import load_checkpoint
from pkd_offline.data import CocoDetection, ViewSampler, collate
from pkd_offline.distributed import Ranks
from pkd_offline.engine import Distillation, distillation_loss
from pkd_offline.errors import PkdError
from pkd_offline.levels import pair_levels
from pkd_offline.models import build_detector
from pkd_offline.pyramid import valid_masks
from stages.evaluate import EvalConfig, evaluate
from stages.extract import ExtractConfig, extract
from pkd_offline.store_data import StoreJoinedDataset, store_views
from pkd_offline.store_fit import check_store_fits
from pkd_offline.teachers import load_teacher
from stages.train import TrainConfig, train
from storage import open_store

SMALL = dict(variant="tiny", short_side=128, max_size=128, batch_size=4, workers=0, progress=False,
             optimizer="adamw", lr=1e-3, warmup_iters=1, val_split=None)


@pytest.fixture(scope="module")
def fp16_store(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "train.zarr"
    return extract(ExtractConfig(teacher="swin", random_init=True, variant="tiny", data=synth_data, out=out, views=2,
                                 short_side=128, max_size=128, batch_size=4, workers=0, samples_per_shard=4,
                                 codec="fp16", progress=False))


def square_batch(dataset, joined, student):
    """Three store-joined samples of 128x128 images (no padding), their images and the student's FPN maps (eval)."""
    same_size = [k for k in [(i, v) for i in range(len(dataset)) for v in (0, 1)]
                 if dataset.original_hw(dataset.image_ids[k[0]]) == (128, 128)][:3]
    batch = collate([joined[key] for key in same_size])
    images = [item["image"] for item in batch]
    student.eval()
    with torch.no_grad():
        _, student_features = student(images)
    return batch, images, student_features


@pytest.mark.parametrize("level_map", ["stride", "index"])
def test_offline_loss_equals_online_loss_on_the_same_batch(synth_data, fp16_store, level_map):
    torch.manual_seed(0)
    views = store_views(fp16_store)
    dataset = CocoDetection(synth_data, "train", views)
    student = build_detector("retinanet", num_classes=dataset.num_classes, variant="tiny", backbone="resnet18")
    check_store_fits(fp16_store, dataset, student)
    joined = StoreJoinedDataset(dataset, fp16_store)
    teacher, _ = load_teacher("swin", checkpoint=None, random_init=True, variant="tiny", num_classes=7, seed=0)
    pairs = pair_levels(list(student.strides), list(teacher.strides), level_map)[:4]
    batch, images, student_features = square_batch(dataset, joined, student)
    device = torch.device("cpu")
    offline = distillation_loss(student_features, batch, images, Distillation(pairs, 6.0), 32, device)
    online = distillation_loss(student_features, batch, images, Distillation(pairs, 6.0, teacher), 32, device)
    assert offline.item() > 0.5
    assert offline.item() == pytest.approx(online.item(), rel=2e-3)


def test_ragged_batch_masks_and_loss_match_a_per_image_reference(synth_data, fp16_store, monkeypatch):
    """The masks the training step builds for a batch of a 128 px and a 96 px high image, and the loss they give:
    1 - Pearson r per channel over every image's own valid positions only (float64, np.corrcoef), summed."""
    import math

    import numpy as np

    import pkd_offline.engine as engine

    torch.manual_seed(0)
    dataset = CocoDetection(synth_data, "train", store_views(fp16_store))
    joined = StoreJoinedDataset(dataset, fp16_store)
    heights = {dataset.original_hw(image_id)[0]: index for index, image_id in enumerate(dataset.image_ids)}
    batch = collate([joined[(heights[128], 0)], joined[(heights[96], 1)]])
    assert [item["image_hw"] for item in batch] == [(128, 128), (96, 128)]
    images = [item["image"] for item in batch]
    student = build_detector("retinanet", num_classes=dataset.num_classes, variant="tiny", backbone="resnet18")
    student.eval()
    with torch.no_grad():
        _, student_features = student(images)
    pairs = pair_levels(list(student.strides), [8, 16, 32, 64], "stride")
    built = []
    monkeypatch.setattr(engine, "valid_masks", lambda *args, **kw: built.append(valid_masks(*args, **kw)) or built[-1])
    loss = distillation_loss(student_features, batch, images, Distillation(pairs, 1.0), 32, torch.device("cpu"))
    masks = built[0]
    expected_loss = 0.0
    for _, stride in pairs:
        assert masks[stride].shape == (2, math.ceil(128 / stride), math.ceil(128 / stride))
        student_values, teacher_values = [], []
        for i, item in enumerate(batch):
            h, w = math.ceil(item["image_hw"][0] / stride), math.ceil(item["image_hw"][1] / stride)
            assert masks[stride][i].sum() == h * w and masks[stride][i, :h, :w].all()
            student_values.append(student_features[stride][i, :, :h, :w].reshape(64, -1).double().numpy())
            teacher_values.append(item["teacher_features"][stride][:, :h, :w].reshape(64, -1).double().numpy())
        s, t = np.concatenate(student_values, axis=1), np.concatenate(teacher_values, axis=1)
        expected_loss += float(np.mean([1 - np.corrcoef(s[c], t[c])[0, 1] for c in range(64)]))
    assert masks[8][1].sum() < masks[8][0].sum(), "the shorter image must have padding"
    assert loss.item() == pytest.approx(expected_loss, abs=2e-3)


@pytest.mark.parametrize("store_name", ["f.zarr", "wds"])
def test_training_replays_the_view_extraction_used(synth_data, tmp_path, store_name):
    """Through both training paths (zarr: map-style join; WebDataset: the stream), the teacher run on the
    replayed training image gives the stored maps: extraction and training saw the same tensor."""
    from pkd_offline.store_data import StoreStream

    store = extract(ExtractConfig(teacher="swin", random_init=True, variant="tiny", data=synth_data,
                                  out=tmp_path / store_name, views=2, short_side=128, max_size=128, batch_size=1,
                                  workers=0, samples_per_shard=4, codec="fp32", progress=False))
    dataset = CocoDetection(synth_data, "train", store_views(store))
    assert [view.flip for view in dataset.views] == [False, True]
    if store_name == "wds":
        items = list(StoreStream(dataset, store, seed=0, shuffle_buffer=1))
    else:
        joined = StoreJoinedDataset(dataset, store)
        items = [joined[key] for key in [(0, 0), (1, 1), (5, 1), (6, 0)]]
    assert {item["view_index"] for item in items} == {0, 1} and {item["image_hw"][0] for item in items} == {96, 128}
    teacher, _ = load_teacher("swin", checkpoint=None, random_init=True, variant="tiny", num_classes=7, seed=0)
    for item in items:
        with torch.inference_mode():
            fresh, _ = teacher.features([item["image"]])
        assert set(item["teacher_features"]) == {4, 8, 16, 32, 64}
        for stride, stored in item["teacher_features"].items():
            assert stored.shape == fresh[stride][0].shape
            torch.testing.assert_close(stored, fresh[stride][0], rtol=0, atol=1e-5)


def test_mismatched_store_is_refused_with_what_differs(synth_data, fp16_store, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    annotations = data / "annotations" / "instances_train.json"
    content = json.loads(annotations.read_text())
    content["images"] = content["images"][:-1]
    annotations.write_text(json.dumps(content))
    dataset = CocoDetection(data, "train", store_views(fp16_store))
    student = build_detector("retinanet", num_classes=7, variant="tiny", backbone="resnet18")
    with pytest.raises(PkdError, match="annotation file .* image ids differ"):
        check_store_fits(fp16_store, dataset, student)
    wide = build_detector("retinanet", num_classes=7, variant="full", backbone="resnet18")
    with pytest.raises(PkdError, match="channels"):
        check_store_fits(fp16_store, CocoDetection(synth_data, "train", store_views(fp16_store)), wide)
    with pytest.raises(PkdError, match="split"):
        check_store_fits(fp16_store, CocoDetection(synth_data, "val", store_views(fp16_store)), student)


def test_three_modes_train_and_evaluate(synth_data, fp16_store, tmp_path):
    runs = {
        "baseline": TrainConfig(student="retinanet", backbone="resnet18", data=synth_data, out=tmp_path / "b", iters=2, **SMALL),
        "offline": TrainConfig(student="retinanet", backbone="resnet18", data=synth_data, out=tmp_path / "off", iters=2,
                               features=fp16_store, level_map="index", **SMALL),
        "online": TrainConfig(student="retinanet", backbone="resnet18", data=synth_data, out=tmp_path / "on", iters=2,
                              teacher="swin", random_init=True, **SMALL),
    }
    for name, cfg in runs.items():
        model_path = train(cfg)
        log = [json.loads(line) for line in (cfg.out / "log.jsonl").read_text().splitlines()]
        assert [r["iter"] for r in log] == [1, 2]
        assert all(r["loss"] == pytest.approx(r["loss_det"] + r["loss_pkd"], rel=1e-5) for r in log)
        assert (log[0]["loss_pkd"] > 0) == (name != "baseline")
        stats = evaluate(EvalConfig(checkpoint=model_path, data=synth_data, split="val", progress=False))
        assert set(stats) == {"mAP", "AP50", "AP75", "APs", "APm", "APl"}
    content = load_checkpoint(tmp_path / "off" / "model.pt")
    assert content["distill_pairs"] == [[8, 4], [16, 8], [32, 16], [64, 32]]


def test_resume_continues_where_it_stopped(synth_data, tmp_path):
    # Faster R-CNN draws from the global RNG (its box samplers); 8 images in batches of 4 are 2 steps an epoch,
    # so stopping after steps 1 and 3 stops mid-epoch on both sides of an epoch boundary. Resume is exact.
    common = {**SMALL, "student": "fasterrcnn", "backbone": "resnet18", "data": synth_data, "iters": 5,
              "checkpoint_every": 100, "short_side": 64, "max_size": 64}
    train(TrainConfig(out=tmp_path / "straight", **common))
    train(TrainConfig(out=tmp_path / "resumed", stop_after=1, **common))
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["iteration"] == 1
    train(TrainConfig(out=tmp_path / "resumed", resume=True, stop_after=2, **common))
    last = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert (last["iteration"], last["epoch"], last["step_in_epoch"]) == (3, 1, 1)
    assert not (tmp_path / "resumed" / "model.pt").exists()
    train(TrainConfig(out=tmp_path / "resumed", resume=True, **common))
    straight = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in resumed] == [1, 2, 3, 4, 5] and [r["epoch"] for r in resumed] == [0, 0, 1, 1, 2]
    for key in ("loss", "loss_det", "loss_pkd", "lr"):
        assert [r[key] for r in resumed] == [r[key] for r in straight], key
    first = load_checkpoint(tmp_path / "straight" / "model.pt")["model"]
    second = load_checkpoint(tmp_path / "resumed" / "model.pt")["model"]
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_webdataset_stream_yields_each_image_once_per_epoch_and_trains(synth_data, tmp_path):
    from pkd_offline.store_data import StoreStream

    store = extract(ExtractConfig(teacher="swin", random_init=True, variant="tiny", data=synth_data,
                                  out=tmp_path / "wds", views=2, short_side=128, max_size=128, batch_size=4,
                                  workers=0, samples_per_shard=3, progress=False))
    dataset = CocoDetection(synth_data, "train", store_views(store))
    stream = StoreStream(dataset, store, seed=1, shuffle_buffer=4)
    orders = []
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        items = list(stream)
        assert sorted(item["image_id"] for item in items) == dataset.image_ids
        # The view kept for each image is the one the zarr sampler picks for this (seed, epoch).
        sampler = ViewSampler(len(dataset), 2, seed=1)
        sampler.set_epoch(epoch)
        assert {(item["image_id"], item["view_index"]) for item in items} == \
            {(dataset.image_ids[index], view) for index, view in sampler.keys()}
        orders.append([(item["image_id"], item["view_index"]) for item in items])
    assert orders[0] != orders[1]
    assert {v for order in orders for _, v in order} == {0, 1}
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    assert sorted(item["image_id"] for item in loader) == dataset.image_ids, "workers read disjoint shards"
    # Split by rank (2 ranks, 3 shards): disjoint, and together every image once.
    per_rank = [[item["image_id"] for item in StoreStream(dataset, store, seed=1, rank=rank, num_replicas=2)]
                for rank in (0, 1)]
    assert all(per_rank) and not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == dataset.image_ids
    cfg = TrainConfig(student="retinanet", backbone="resnet18", data=synth_data, out=tmp_path / "run", iters=3,
                      features=store, **SMALL)
    train(cfg)
    log = [json.loads(line) for line in (cfg.out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(r["loss_pkd"] > 0 for r in log)
    # Resume on a stream: stopped after step 1, resumed across the epoch boundary, the same losses.
    resumed = TrainConfig(**{**vars(cfg), "out": tmp_path / "resumed", "stop_after": 1})
    train(resumed)
    train(TrainConfig(**{**vars(resumed), "stop_after": None, "resume": True}))
    again = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in again] == [1, 2, 3] and [r["epoch"] for r in again] == [0, 0, 1]
    assert [r["loss"] for r in again] == [r["loss"] for r in log]


def test_max_pairs_limits_the_distilled_pairs(synth_data, fp16_store):
    from stages.train import setup_distillation

    dataset = CocoDetection(synth_data, "train", store_views(fp16_store))
    student = build_detector("retinanet", num_classes=dataset.num_classes, variant="tiny", backbone="resnet18")
    for max_pairs, expected in ((4, [(8, 4), (16, 8), (32, 16), (64, 32)]), (2, [(8, 4), (16, 8)])):
        cfg = TrainConfig(student="retinanet", data=synth_data, features=fp16_store, level_map="index",
                          max_pairs=max_pairs, **SMALL)
        _, distill = setup_distillation(cfg, dataset, student, torch.device("cpu"), Ranks())
        assert [tuple(pair) for pair in distill.pairs] == expected


def test_join_refuses_a_sample_whose_recorded_size_differs_from_the_replay(synth_data, fp16_store):
    from pkd_offline.store_data import join_features

    dataset = CocoDetection(synth_data, "train", store_views(fp16_store))
    item = dataset[(1, 0)]
    sample = open_store(str(fp16_store)).read(2)
    assert join_features(dict(item), sample)["teacher_features"][8].shape[0] == 64
    sample.image_hw = (item["image_hw"][0] + 32, item["image_hw"][1])
    with pytest.raises(PkdError, match=r"replays to .* but the store recorded .*re-extract the store"):
        join_features(dict(item), sample)


def test_mse_imitation_trains_from_the_store_as_online_and_equals_the_map_mse(synth_data, fp16_store):
    """--loss mse: the same pairs as PKD, a plain MSE over the valid region; offline (from the store) equals online,
    both equal alpha times the map MSE written out, and TrainConfig's setting reaches the Distillation."""
    import torch.nn.functional as F

    from stages.train import setup_distillation

    torch.manual_seed(0)
    dataset = CocoDetection(synth_data, "train", store_views(fp16_store))
    student = build_detector("retinanet", num_classes=dataset.num_classes, variant="tiny", backbone="resnet18")
    cfg = TrainConfig(student="retinanet", data=synth_data, features=fp16_store, level_map="index", loss="mse", **SMALL)
    joined, distill = setup_distillation(cfg, dataset, student, torch.device("cpu"), Ranks())
    assert distill.loss == "mse"
    teacher, _ = load_teacher("swin", checkpoint=None, random_init=True, variant="tiny", num_classes=7, seed=0)
    batch, images, student_features = square_batch(dataset, joined, student)
    with torch.no_grad():
        teacher_features, _ = teacher.features(images)
    device = torch.device("cpu")
    offline = distillation_loss(student_features, batch, images, distill, 32, device)
    online = distillation_loss(student_features, batch, images, Distillation(distill.pairs, 6.0, teacher, loss="mse"),
                               32, device)
    pcc = distillation_loss(student_features, batch, images, Distillation(distill.pairs, 6.0), 32, device)
    written_out = 6.0 * sum(
        (F.interpolate(student_features[s].double(), size=teacher_features[t].shape[-2:], mode="bilinear",
                       align_corners=False) - teacher_features[t].double()).square().mean()
        for s, t in distill.pairs)
    assert online.item() == pytest.approx(written_out.item(), rel=1e-5)
    assert offline.item() == pytest.approx(online.item(), rel=2e-3)
    assert abs(offline.item() - pcc.item()) > 0.1
