"""A torchvision detector whose FPN outputs come out of the same forward as its losses."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn


class FeatureDetector(nn.Module):
    """Wraps a torchvision detector (``detector.backbone`` returns the FPN's ordered dict).

    ``forward(images, targets)`` returns ``(output, features)``: output is the detector's loss dict in
    training mode and its detections in eval mode; features is ``{stride: Tensor[N, C, H, W]}``
    (stride in px) from the same backbone pass. ``spec`` holds the builder arguments that rebuild
    the model from a checkpoint.
    """

    def __init__(self, detector: nn.Module, strides: tuple[int, ...], spec: dict) -> None:
        super().__init__()
        self.detector = detector
        self.strides = tuple(strides)
        self.spec = dict(spec)

    def freeze_backbone_norm(self) -> None:
        """Keep the backbone's batch norms at their loaded statistics and affine terms (``spec["frozen_backbone_norm"]``)."""
        for module in self.detector.backbone.body.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
                for parameter in module.parameters():
                    parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> "FeatureDetector":
        super().train(mode)
        if mode and self.spec.get("frozen_backbone_norm"):
            self.freeze_backbone_norm()
        return self

    @property
    def transform(self):
        return self.detector.transform

    @property
    def channels(self) -> int:
        return self.detector.backbone.out_channels

    def _by_stride(self, pyramid: "OrderedDict[str, Tensor]") -> dict[int, Tensor]:
        if len(pyramid) != len(self.strides):
            raise RuntimeError(f"backbone returned {len(pyramid)} levels, expected strides {self.strides}")
        return dict(zip(self.strides, pyramid.values()))

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        captured: list = []
        handle = self.detector.backbone.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            output = self.detector(images, targets)
        finally:
            handle.remove()
        return output, self._by_stride(captured[0])

    def features(self, images: list[Tensor], backbone=None) -> tuple[dict[int, Tensor], list[tuple[int, int]]]:
        """Backbone+FPN only: ``({stride: (N, C, H/stride, W/stride)}, image_sizes)`` for (3, h, w) 0..1 images;
        ``backbone``: a stand-in for the backbone+FPN on the padded batch (e.g. a ``GraphedForward`` of it)."""
        image_list, _ = self.detector.transform(images)
        pyramid = (backbone or self.detector.backbone)(image_list.tensors)
        return self._by_stride(pyramid), image_list.image_sizes
