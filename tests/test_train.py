import json
import shutil
from pathlib import Path

import pytest
import torch

from pkd_offline.checkpoint import load_checkpoint
from pkd_offline.data import CocoDetection, collate
from pkd_offline.engine import Distillation, distillation_loss
from pkd_offline.errors import PkdError
from pkd_offline.levels import pair_levels
from pkd_offline.models import build_detector
from stages.evaluate import EvalConfig, evaluate
from stages.extract import ExtractConfig, extract
from stages.store_data import StoreJoinedDataset, check_store_fits, store_views
from stages.teachers import load_teacher
from stages.train import TrainConfig, train

SMALL = dict(variant="tiny", short_side=128, max_size=128, batch_size=4, workers=0, progress=False,
             optimizer="adamw", lr=1e-3, warmup_iters=1, val_split=None)


@pytest.fixture(scope="module")
def fp16_store(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "train.zarr"
    return extract(ExtractConfig(teacher="swin", random_init=True, variant="tiny", data=synth_data, out=out, views=2,
                                 short_side=128, max_size=128, batch_size=4, workers=0, samples_per_shard=4,
                                 codec="fp16", progress=False))


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
    same_size = [k for k in [(i, v) for i in range(len(dataset)) for v in (0, 1)]
                 if dataset.original_hw(dataset.image_ids[k[0]]) == (128, 128)][:3]
    batch = collate([joined[key] for key in same_size])
    images = [item["image"] for item in batch]
    student.eval()
    with torch.no_grad():
        _, student_features = student(images)
    device = torch.device("cpu")
    offline = distillation_loss(student_features, batch, images, Distillation(pairs, 6.0), 32, device)
    online = distillation_loss(student_features, batch, images, Distillation(pairs, 6.0, teacher), 32, device)
    assert offline.item() > 0.5
    assert offline.item() == pytest.approx(online.item(), rel=2e-3)


def test_view_replay_matches_the_store(synth_data, fp16_store):
    dataset = CocoDetection(synth_data, "train", store_views(fp16_store))
    joined = StoreJoinedDataset(dataset, fp16_store)
    for key in [(0, 0), (1, 1), (5, 1)]:
        item = joined[key]
        assert set(item["teacher_features"]) == {4, 8, 16, 32, 64}
        assert item["teacher_features"][8].shape[-2:] == (-(-item["image_hw"][0] // 32) * 4,
                                                          -(-item["image_hw"][1] // 32) * 4)


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
    common = dict(student="fasterrcnn", backbone="resnet18", data=synth_data, iters=4, checkpoint_every=100, **SMALL)
    train(TrainConfig(out=tmp_path / "straight", **common))
    train(TrainConfig(out=tmp_path / "resumed", stop_after=2, **common))
    assert not (tmp_path / "resumed" / "model.pt").exists()
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["iteration"] == 2
    train(TrainConfig(out=tmp_path / "resumed", resume=True, **common))
    straight = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], rel=1e-5)
    first = load_checkpoint(tmp_path / "straight" / "model.pt")["model"]
    second = load_checkpoint(tmp_path / "resumed" / "model.pt")["model"]
    assert all(torch.allclose(first[k].float(), second[k].float(), atol=1e-6) for k in first)


def test_webdataset_stream_yields_each_image_once_per_epoch_and_trains(synth_data, tmp_path):
    from stages.store_data import StoreStream

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
        orders.append([(item["image_id"], item["view_index"]) for item in items])
    assert orders[0] != orders[1]
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    assert sorted(item["image_id"] for item in loader) == dataset.image_ids, "workers read disjoint shards"
    cfg = TrainConfig(student="retinanet", backbone="resnet18", data=synth_data, out=tmp_path / "run", iters=3,
                      features=store, **SMALL)
    train(cfg)
    log = [json.loads(line) for line in (cfg.out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(r["loss_pkd"] > 0 for r in log)
