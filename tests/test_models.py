import pytest
import torch

from pkd_offline.errors import PkdError
from pkd_offline.models import DETECTORS, P2_P6, P3_P7, STUDENTS, build_detector


def _targets(sizes, masks=False):
    targets = []
    for i, (h, w) in enumerate(sizes):
        boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0]]) if i == 0 else torch.zeros(0, 4)
        target = {"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64)}
        if masks:
            target["masks"] = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
            if len(boxes):
                target["masks"][0, 6:50, 4:40] = 1
        targets.append(target)
    return targets


@pytest.mark.parametrize("name", list(DETECTORS))
def test_every_detector_returns_losses_and_fpn_by_stride_in_one_forward(name):
    torch.manual_seed(0)
    model = build_detector(name, num_classes=4, variant="tiny")
    sizes = [(96, 128), (64, 96)]  # ragged: the transform pads to 96 x 128
    images = [torch.rand(3, h, w) for h, w in sizes]
    model.train()
    losses, features = model(images, _targets(sizes, masks=name == "maskrcnn"))
    expected = P3_P7 if name in ("retinanet", "fcos") else P2_P6
    assert tuple(features) == expected
    for stride, level in features.items():
        assert level.shape == (2, 64, -(-96 // stride), -(-128 // stride))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        detections, _ = model(images)
        teacher_maps, image_sizes = model.features(images)
    assert len(detections) == 2 and {"boxes", "scores", "labels"} <= set(detections[0])
    assert image_sizes == sizes, "the transform must not resize"
    assert torch.allclose(teacher_maps[expected[0]], model(images)[1][expected[0]])


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3", "resnet50"])
def test_student_backbones_are_selectable(backbone):
    torch.manual_seed(0)
    model = build_detector("retinanet", num_classes=3, variant="tiny", backbone=backbone)
    model.eval()
    with torch.no_grad():
        _, features = model([torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))])
    assert tuple(features) == P3_P7


def test_full_variant_has_paper_fpn_width():
    model = build_detector("retinanet", num_classes=81, variant="full", backbone="resnet50")
    assert model.channels == 256
    assert sum(p.numel() for p in model.parameters()) > 30_000_000


def test_unknown_names_list_the_known_ones():
    with pytest.raises(PkdError, match="retinanet, fcos"):
        build_detector("yolo", num_classes=3)
    with pytest.raises(PkdError, match="resnet50, resnet18, mobilenet_v3"):
        build_detector("retinanet", num_classes=3, backbone="vgg")
    assert set(STUDENTS) <= set(DETECTORS)


def test_normalisation_equals_torchvisions_and_makes_its_constants_once_per_device_and_dtype(monkeypatch):
    """The transform normalises as torchvision does, bit for bit, but builds mean and std once (built per image
    they are copies from pageable memory, each waiting for a GPU's queue)."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from pkd_offline.models.transform import NormalizeAndPad

    transform = NormalizeAndPad()
    image = torch.rand(3, 17, 23, generator=torch.Generator().manual_seed(0))
    expected = GeneralizedRCNNTransform.normalize(transform, image)
    made = []
    real = torch.as_tensor
    monkeypatch.setattr(torch, "as_tensor", lambda *a, **k: made.append(1) or real(*a, **k))
    for _ in range(3):
        assert torch.equal(transform.normalize(image), expected)
    assert len(made) == 2  # mean and std, once
    transform.normalize(image.double())
    assert len(made) == 4  # another dtype: its own constants


def test_fcos_box_regression_learns_from_scratch(tmp_path):
    """From random weights, AdamW on one batch of the accuracy study's kind of data: FCOS's GIoU loss falls (with
    the sides starting at zero it stays at 1.0, every box of zero width or height, and the ReLU passes no
    gradient back)."""
    from pkd_offline.data import CocoDetection
    from pkd_offline.views import make_views
    from stages.synth import SynthConfig, synth

    data = synth(SynthConfig(out=tmp_path / "data", train=8, val=1, image_size=128, seed=1, min_object_side=16))
    dataset = CocoDetection(data, "train", make_views(1, 128, 128))
    batch = [dataset[(i, 0)] for i in range(8)]
    images, targets = [item["image"] for item in batch], [item["target"] for item in batch]
    torch.manual_seed(0)
    model = build_detector("fcos", num_classes=dataset.num_classes, variant="tiny", backbone="mobilenet_v3")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.002, weight_decay=0.05)
    model.train()
    regression = []
    for _ in range(12):
        losses, _ = model(images, targets)
        regression.append(float(losses["bbox_regression"]))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert regression[-1] < 0.9 * regression[0] and regression[-1] < 0.95, regression
