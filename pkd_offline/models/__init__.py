"""Detector builders: plain functions in one dict, ``DETECTORS`` (print it to see every name).

Students: ``retinanet``, ``fcos`` (P3..P7) and ``fasterrcnn``, ``maskrcnn`` (P2..P6) with a CNN
backbone (``resnet50`` by default, ``resnet18``, ``mobilenet_v3``). Teachers: ``swin`` (Swin-T),
``swin_s``, ``swin_b`` with an FPN and a Faster R-CNN head, and ``resnet50`` (Faster R-CNN R50-FPN);
any trained detector of the project can also serve as a teacher. ``variant="tiny"`` shrinks depth
and width in the same builder for CPU runs. Anchors scale with the variant: ``full`` uses the COCO
sizes (4x the stride), ``tiny`` half of them, for small images. RetinaNet takes two options
(``MODEL_OPTIONS``), kept in ``spec`` so a checkpoint rebuilds the same model: ``anchor_scale``
(anchor side over stride at the first octave) and ``head_norm="gn"`` (GroupNorm in the head).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from pkd_offline.errors import PkdError
from pkd_offline.models.backbones import cnn_fpn, fpn_channels
from pkd_offline.models.detector import FeatureDetector
from pkd_offline.models.swin import SwinFPN
from pkd_offline.models.transform import NormalizeAndPad

VARIANTS = ("full", "tiny")
P3_P7 = (8, 16, 32, 64, 128)
P2_P6 = (4, 8, 16, 32, 64)
COMMON = {"min_size": 1, "max_size": 1, "detections_per_img": 100}


def _anchor_sizes(strides: tuple[int, ...], variant: str, octaves: bool,
                  scale: float | None = None) -> tuple[tuple[int, ...], ...]:
    """Anchor sides in px per level: ``scale`` x stride (default 4 for ``full``, 2 for ``tiny``), times
    2^(0, 1/3, 2/3) with ``octaves``."""
    base = scale if scale is not None else 4 if variant == "full" else 2
    scales = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)) if octaves else (1.0,)
    return tuple(tuple(int(base * s * k) for k in scales) for s in strides)


def _wrap(detector: nn.Module, strides: tuple[int, ...], spec: dict) -> FeatureDetector:
    detector.transform = NormalizeAndPad(size_divisor=32)
    return FeatureDetector(detector, strides, spec)


def build_retinanet(*, num_classes: int, variant: str = "full", backbone: str = "resnet50",
                    anchor_scale: float | None = None, head_norm: str | None = None) -> FeatureDetector:
    """RetinaNet on P3..P7. ``anchor_scale``: anchor side / stride at the first octave (None: the variant's);
    ``head_norm="gn"``: GroupNorm (16 groups) after each head conv, as torchvision's RetinaNet v2 head."""
    channels = fpn_channels(variant)
    fpn = cnn_fpn(backbone, variant=variant, first_stride=8, extra_blocks=LastLevelP6P7(channels, channels))
    sizes = _anchor_sizes(P3_P7, variant, octaves=True, scale=anchor_scale)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    head = None
    if head_norm is not None:
        if head_norm != "gn":
            raise PkdError(f"unknown head_norm {head_norm!r}: choose gn")
        head = RetinaNetHead(channels, anchors.num_anchors_per_location()[0], num_classes,
                             norm_layer=partial(nn.GroupNorm, 16))
    detector = RetinaNet(fpn, num_classes, anchor_generator=anchors, head=head, **COMMON)
    spec = {"name": "retinanet", "variant": variant, "backbone": backbone, "num_classes": num_classes}
    spec.update({k: v for k, v in (("anchor_scale", anchor_scale), ("head_norm", head_norm)) if v is not None})
    return _wrap(detector, P3_P7, spec)


FCOS_SIDE_BIAS = 1.0  # each box side starts one anchor size (the level's stride) from its location


def build_fcos(*, num_classes: int, variant: str = "full", backbone: str = "resnet50") -> FeatureDetector:
    """FCOS on P3..P7, one location-sized anchor per level. The box regression's output bias starts at
    ``FCOS_SIDE_BIAS``: torchvision's head puts the four side distances through a ReLU and starts them at zero
    bias, so about half start at zero, where a box of zero width or height gets no gradient from the GIoU loss,
    and from scratch the regression dies (GIoU loss fixed at 1.0) within a few steps."""
    channels = fpn_channels(variant)
    fpn = cnn_fpn(backbone, variant=variant, first_stride=8, extra_blocks=LastLevelP6P7(channels, channels))
    anchors = AnchorGenerator(tuple((s,) for s in P3_P7), ((1.0,),) * len(P3_P7))
    detector = FCOS(fpn, num_classes, anchor_generator=anchors, score_thresh=0.05, **COMMON)
    nn.init.constant_(detector.head.regression_head.bbox_reg.bias, FCOS_SIDE_BIAS)
    return _wrap(detector, P3_P7, {"name": "fcos", "variant": variant, "backbone": backbone, "num_classes": num_classes})


def _rcnn(fpn: nn.Module, *, num_classes: int, variant: str, masks: bool) -> nn.Module:
    sizes = _anchor_sizes(P2_P6, variant, octaves=False)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    representation = 1024 if variant == "full" else 256
    # Small images hold few objects: fewer proposals and sampled RoIs keep CPU steps short.
    sampling = {} if variant == "full" else {
        "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300, "rpn_pre_nms_top_n_test": 300,
        "rpn_post_nms_top_n_test": 150, "box_batch_size_per_image": 128}
    heads = {"box_head": TwoMLPHead(fpn.out_channels * 7 * 7, representation),
             "box_predictor": FastRCNNPredictor(representation, num_classes)}
    if not masks:
        return FasterRCNN(fpn, None, rpn_anchor_generator=anchors, **heads, **sampling, **COMMON)
    mask_layers = (256,) * 4 if variant == "full" else (fpn.out_channels,) * 2
    mask_head = MaskRCNNHeads(fpn.out_channels, mask_layers, 1)
    mask_predictor = MaskRCNNPredictor(mask_layers[-1], mask_layers[-1], num_classes)
    return MaskRCNN(fpn, None, rpn_anchor_generator=anchors, mask_head=mask_head, mask_predictor=mask_predictor,
                    **heads, **sampling, **COMMON)


def build_fasterrcnn(*, num_classes: int, variant: str = "full", backbone: str = "resnet50") -> FeatureDetector:
    fpn = cnn_fpn(backbone, variant=variant, first_stride=4, extra_blocks=LastLevelMaxPool())
    detector = _rcnn(fpn, num_classes=num_classes, variant=variant, masks=False)
    return _wrap(detector, P2_P6, {"name": "fasterrcnn", "variant": variant, "backbone": backbone, "num_classes": num_classes})


def build_maskrcnn(*, num_classes: int, variant: str = "full", backbone: str = "resnet50") -> FeatureDetector:
    fpn = cnn_fpn(backbone, variant=variant, first_stride=4, extra_blocks=LastLevelMaxPool())
    detector = _rcnn(fpn, num_classes=num_classes, variant=variant, masks=True)
    return _wrap(detector, P2_P6, {"name": "maskrcnn", "variant": variant, "backbone": backbone, "num_classes": num_classes})


def _swin_builder(name: str) -> Callable[..., FeatureDetector]:
    def build(*, num_classes: int, variant: str = "full", backbone: str = name) -> FeatureDetector:
        fpn = SwinFPN(name, tiny=variant == "tiny", fpn_channels=fpn_channels(variant))
        detector = _rcnn(fpn, num_classes=num_classes, variant=variant, masks=False)
        return _wrap(detector, P2_P6, {"name": name, "variant": variant, "backbone": name, "num_classes": num_classes})

    build.__name__ = f"build_{name}"
    build.__doc__ = f"{name} backbone + FPN (P2..P6) + Faster R-CNN head."
    return build


def build_resnet50(*, num_classes: int, variant: str = "full", backbone: str = "resnet50") -> FeatureDetector:
    """Faster R-CNN R50-FPN teacher (P2..P6)."""
    detector = build_fasterrcnn(num_classes=num_classes, variant=variant, backbone="resnet50")
    detector.spec["name"] = "resnet50"
    return detector


DETECTORS: dict[str, Callable[..., FeatureDetector]] = {
    "retinanet": build_retinanet,
    "fcos": build_fcos,
    "fasterrcnn": build_fasterrcnn,
    "maskrcnn": build_maskrcnn,
    "swin": _swin_builder("swin"),
    "swin_s": _swin_builder("swin_s"),
    "swin_b": _swin_builder("swin_b"),
    "resnet50": build_resnet50,
}
STUDENTS = ("retinanet", "fcos", "fasterrcnn", "maskrcnn")
TEACHERS = ("swin", "swin_s", "swin_b", "resnet50")
USES_MASKS = {"maskrcnn"}


MODEL_OPTIONS = {"anchor_scale": {"retinanet"}, "head_norm": {"retinanet"}}  # option -> builders that take it


def build_detector(name: str, *, num_classes: int, variant: str = "full", backbone: str | None = None,
                   **options) -> FeatureDetector:
    """Build detector ``name`` (a key of ``DETECTORS``) with random weights. ``options`` (``MODEL_OPTIONS``:
    ``anchor_scale`` anchor side / stride, ``head_norm``; None means the builder's default) are kept in the
    model's ``spec``, so a checkpoint rebuilds the same model. PkdError on unknown names and on an option
    the detector does not take."""
    if name not in DETECTORS:
        raise PkdError(f"unknown model {name!r}: choose one of {', '.join(DETECTORS)}")
    if variant not in VARIANTS:
        raise PkdError(f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    kwargs = {"num_classes": num_classes, "variant": variant}
    if backbone is not None and name not in TEACHERS:
        kwargs["backbone"] = backbone
    for option, value in options.items():
        if value is None:
            continue
        if option not in MODEL_OPTIONS:
            raise PkdError(f"unknown model option {option!r}: choose one of {', '.join(MODEL_OPTIONS)}")
        if name not in MODEL_OPTIONS[option]:
            raise PkdError(f"--{option.replace('_', '-')} applies to {', '.join(sorted(MODEL_OPTIONS[option]))}, not {name!r}")
        if option == "anchor_scale" and value <= 0:
            raise PkdError(f"--anchor-scale must be positive, got {value}")
        kwargs[option] = value
    return DETECTORS[name](**kwargs)
