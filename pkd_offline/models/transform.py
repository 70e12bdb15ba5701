"""The detectors' input transform: normalise and pad to a batch, never resize (views resize)."""

from __future__ import annotations

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

    def normalization(self) -> dict:
        """The input normalisation, as recorded in a feature store's manifest."""
        return {"mean": list(self.image_mean), "std": list(self.image_std), "input_range": "0..1",
                "size_divisor": self.size_divisible}
