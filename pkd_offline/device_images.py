"""Training images decoded on the training device: the DataLoader workers hand on each JPEG file's bytes
(``CocoDetection(image_decode="device")``), and the step decodes the batch at once with
``torchvision.io.decode_jpeg`` on its device (nvJPEG on CUDA) and replays each image's view there, so the
workers' CPU time per image is reading a file. Targets were already put in view pixels by the workers."""

from __future__ import annotations

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from pkd_offline.errors import PkdError
from pkd_offline.views import view_image


def decode_on(batch: list[dict], device: torch.device) -> list[dict]:
    """``batch`` with every item's ``jpeg`` bytes decoded on ``device`` and its ``view`` applied: ``image`` (3, h, w)
    float32 in 0..1 there, as the workers would have made it (up to the decoder's rounding); a batch whose items
    carry images already comes back as it is. PkdError naming the image where a file does not decode."""
    if not any("jpeg" in item for item in batch):
        return batch
    data = [item["jpeg"] for item in batch]
    try:
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        images = [_decode_one(item, device) for item in batch]  # one by one, to name the file that fails
    decoded = []
    for item, image in zip(batch, images):
        image = view_image(image, item["view"])
        if tuple(image.shape[-2:]) != tuple(item["image_hw"]):
            raise PkdError(f"image {item['image_id']} decodes to {tuple(image.shape[-2:])} px after its view, not "
                           f"{tuple(item['image_hw'])}: its file does not match its header; replace it")
        decoded.append({**{k: v for k, v in item.items() if k not in ("jpeg", "view")}, "image": image})
    return decoded


def _decode_one(item: dict, device: torch.device) -> torch.Tensor:
    try:
        return decode_jpeg(item["jpeg"], mode=ImageReadMode.RGB, device=device)
    except RuntimeError as error:
        reason = str(error).splitlines()[0].rsplit(", ", 1)[-1]  # the decoder's words, past its source location
        raise PkdError(f"image {item['image_id']} does not decode on {device} ({reason}): "
                       "replace it or remove it from the annotation file") from None
