"""The detectors' input transform: normalise and pad to a batch, never resize (views resize)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class NormalizeAndPad(GeneralizedRCNNTransform):
    """torchvision's detection transform with the resize step removed.

    Images arrive already resized by :func:`pkd_offline.views.apply_view`; they are normalised with
    ``IMAGENET_MEAN``/``IMAGENET_STD`` (inputs in 0..1) and zero-padded to a common size that is a
    multiple of ``size_divisor`` px. Postprocessing is then the identity on boxes.
    """

    def __init__(self, size_divisor: int = 32, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__(min_size=1, max_size=1, image_mean=list(mean), image_std=list(std),
                         size_divisible=size_divisor, fixed_size=None)

    def resize(self, image: Tensor, target=None):
        return image, target

    def normalize(self, image: Tensor) -> Tensor:
        """torchvision's normalisation with the mean and std made once per device and dtype: made per image from
        Python lists, each is a copy from pageable memory that waits for all work queued on a GPU."""
        if not image.is_floating_point():
            raise TypeError(f"expected a floating point image, got {image.dtype}")
        key = (image.device, image.dtype)
        constants = self.__dict__.setdefault("_constants", {})
        if key not in constants:
            constants[key] = tuple(torch.as_tensor(values, dtype=image.dtype).to(image.device)[:, None, None]
                                   for values in (self.image_mean, self.image_std))
        mean, std = constants[key]
        return (image - mean) / std

    def normalization(self) -> dict:
        """The input normalisation, as recorded in a feature store's manifest."""
        return {"mean": list(self.image_mean), "std": list(self.image_std), "input_range": "0..1",
                "size_divisor": self.size_divisible}
