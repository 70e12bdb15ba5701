"""Views: a recorded, deterministic preprocessing of one image (resize, then optional horizontal flip).

Both stages call :func:`apply_view`, so the teacher's input at extraction and the student's input in
training are the same tensor for the same (image, view). The detectors' own transform only
normalises and pads (see ``models.transform``); it never resizes again.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pkd_offline.errors import PkdError


@dataclass(frozen=True)
class View:
    """Resize so the short side is ``short_side`` px unless the long side would pass ``max_size`` px.

    ``size_divisor`` (px) is the multiple the batch is padded to; ``flip`` mirrors left-right after
    the resize.
    """

    short_side: int
    max_size: int
    size_divisor: int = 32
    flip: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> View:
        try:
            return cls(int(data["short_side"]), int(data["max_size"]), int(data["size_divisor"]), bool(data["flip"]))
        except (KeyError, TypeError, ValueError) as error:
            raise PkdError(f"malformed view {data!r}: {error}") from None


def make_views(count: int, short_side: int, max_size: int, size_divisor: int = 32,
               extra_scales: tuple[float, ...] = (0.8, 1.2)) -> list[View]:
    """``count`` views: 0 the plain resize, 1 its flip, then further scales (flip alternating)."""
    if count < 1:
        raise PkdError(f"--views must be at least 1, got {count}")
    views = [View(short_side, max_size, size_divisor, False), View(short_side, max_size, size_divisor, True)]
    for i, scale in enumerate(extra_scales * (1 + count // 2)):
        views.append(View(round(short_side * scale), round(max_size * scale), size_divisor, i % 2 == 1))
    return views[:count]


def resized_size(height: int, width: int, view: View) -> tuple[int, int]:
    """(h, w) in pixels after the view's resize of an image of ``height`` x ``width`` px."""
    scale = min(view.short_side / min(height, width), view.max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def padded_size(height: int, width: int, size_divisor: int) -> tuple[int, int]:
    """(h, w) rounded up to multiples of ``size_divisor`` px."""
    return (math.ceil(height / size_divisor) * size_divisor, math.ceil(width / size_divisor) * size_divisor)


def view_padded_size(height: int, width: int, view: View) -> tuple[int, int]:
    """(h, w) px an image of ``height`` x ``width`` px occupies after the view's resize and its own padding."""
    return padded_size(*resized_size(height, width, view), view.size_divisor)


def apply_view(image: Tensor, target: dict[str, Tensor] | None, view: View) -> tuple[Tensor, dict[str, Tensor] | None]:
    """Apply ``view`` to an image and its target together (:func:`view_image`, :func:`view_target`).

    Args:
        image: (3, H, W) uint8 (0..255) or float (0..1).
        target: optional dict with ``boxes`` (K, 4) float xyxy in pixels and optionally ``masks``
            (K, H, W) uint8; other keys pass through.
    Returns:
        The (3, h, w) float32 image in 0..1 and the target with boxes (and masks) in view pixels.
    """
    original_hw = tuple(image.shape[-2:])
    return view_image(image, view), None if target is None else view_target(target, original_hw, view)


def view_image(image: Tensor, view: View) -> Tensor:
    """The (3, h, w) float32 image in 0..1 after ``view``'s resize (bilinear) and flip, on the image's device;
    ``image`` (3, H, W) uint8 (0..255) or float (0..1)."""
    if image.dtype == torch.uint8:
        image = image.float() / 255.0
    height, width = image.shape[-2:]
    new_h, new_w = resized_size(height, width, view)
    if (new_h, new_w) != (height, width):
        image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
    if view.flip:
        image = image.flip(-1)
    return image.contiguous()


def view_target(target: dict[str, Tensor], original_hw: tuple[int, int], view: View) -> dict[str, Tensor]:
    """``target`` of an image of ``original_hw`` (H, W) px in ``view``'s pixels: ``boxes`` (K, 4) xyxy scaled and
    flipped, ``masks`` (K, h, w) uint8 resized (nearest) and flipped; other keys pass through. Needs only the
    image's size, so it runs where the image is not decoded."""
    height, width = original_hw
    new_h, new_w = resized_size(height, width, view)
    target = dict(target)
    boxes = target["boxes"].float() * torch.tensor([new_w / width, new_h / height] * 2)
    if view.flip:
        boxes = torch.stack([new_w - boxes[:, 2], boxes[:, 1], new_w - boxes[:, 0], boxes[:, 3]], dim=1)
    target["boxes"] = boxes
    if "masks" in target:
        masks = target["masks"]
        if masks.numel():
            masks = F.interpolate(masks[None].float(), size=(new_h, new_w), mode="nearest")[0].to(torch.uint8)
        else:
            masks = masks.new_zeros((0, new_h, new_w))
        target["masks"] = masks.flip(-1) if view.flip else masks
    return target


def boxes_to_original(boxes: Tensor, view: View, original_hw: tuple[int, int]) -> Tensor:
    """Map (K, 4) xyxy boxes from view pixels back to the original image's pixels."""
    height, width = original_hw
    new_h, new_w = resized_size(height, width, view)
    boxes = boxes.clone()
    if view.flip:
        boxes = torch.stack([new_w - boxes[:, 2], boxes[:, 1], new_w - boxes[:, 0], boxes[:, 3]], dim=1)
    return boxes * torch.tensor([width / new_w, height / new_h] * 2, dtype=boxes.dtype)
