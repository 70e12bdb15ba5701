import pytest
import torch

from pkd_offline.views import View, apply_view, boxes_to_original, make_views, padded_size, resized_size


def test_resize_keeps_aspect_and_caps_long_side():
    assert resized_size(480, 640, View(800, 1333)) == (800, 1067)
    assert resized_size(400, 1600, View(800, 1333)) == (333, 1333)
    assert padded_size(333, 1333, 32) == (352, 1344)


def test_boxes_follow_pixels_through_resize_and_flip():
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    image[:, 10:20, 5:15] = 255  # a bright square at x 5..15, y 10..20
    target = {"boxes": torch.tensor([[5.0, 10.0, 15.0, 20.0]]), "labels": torch.tensor([1])}
    for flip in (False, True):
        out, moved = apply_view(image, target, View(80, 200, flip=flip))
        assert out.shape == (3, 80, 120) and out.dtype == torch.float32
        x0, y0, x1, y1 = moved["boxes"][0].round().int().tolist()
        inside = out[0, y0 + 1 : y1 - 1, x0 + 1 : x1 - 1]
        assert inside.min() > 0.9, "the box must still cover the square"
        # The box is where the square's pixels are: its edges lie on the half-intensity edges of the
        # resized (bilinear) square, to a pixel; the flip mirrors both.
        rows = (out[0] > 0.5).any(dim=1).nonzero().flatten()
        cols = (out[0] > 0.5).any(dim=0).nonzero().flatten()
        found = [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]
        assert moved["boxes"][0].tolist() == pytest.approx(found, abs=1.0)
        assert moved["boxes"][0].tolist() == pytest.approx([90, 20, 110, 40] if flip else [10, 20, 30, 40])
        assert out[0, :, :x0 - 1].max() < 0.1 and out[0, :, x1 + 1:].max() < 0.1


def test_apply_view_is_deterministic_and_boxes_map_back():
    # Extraction and training replaying the same view: test_train.py::test_training_replays_the_view_extraction_used.
    image = torch.randint(0, 255, (3, 48, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[3.0, 4.0, 30.0, 40.0]])
    view = View(72, 100, flip=True)
    first, target = apply_view(image, {"boxes": boxes}, view)
    second, _ = apply_view(image, {"boxes": boxes}, view)
    assert torch.equal(first, second)
    assert torch.allclose(boxes_to_original(target["boxes"], view, (48, 64)), boxes, atol=1e-4)


def test_masks_follow_flip():
    masks = torch.zeros(1, 10, 10, dtype=torch.uint8)
    masks[0, :, :3] = 1
    _, target = apply_view(torch.zeros(3, 10, 10), {"boxes": torch.tensor([[0.0, 0, 3, 10]]), "masks": masks},
                           View(10, 10, flip=True))
    assert target["masks"][0, :, 7:].all() and not target["masks"][0, :, :7].any()


def test_make_views_plain_then_flip_then_scales():
    views = make_views(4, 800, 1333)
    assert views[0] == View(800, 1333, 32, False) and views[1] == View(800, 1333, 32, True)
    assert views[2].short_side == 640 and views[3].short_side == 960
    assert View.from_dict(views[3].to_dict()) == views[3]
