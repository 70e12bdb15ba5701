"""Weights made by other frameworks: MMDetection Swin teachers, torchvision detectors, ImageNet backbones.

Checkpoint formats a teacher accepts (:func:`detect_checkpoint_format` tells them apart by their keys):

- ``pkd-offline``: the project's own (``{"spec", "model"}``), handled by ``pkd_offline.checkpoint``.
- ``mmdet-swin``: an MMDetection checkpoint (``{"state_dict": ...}`` or the bare dict) of a Swin + FPN
  detector (``backbone.patch_embed.*``, ``backbone.stages.*``, ``backbone.norm0..3``,
  ``neck.lateral_convs.*``, ``neck.fpn_convs.*``), e.g. the paper's Mask R-CNN Swin-S teacher.
- ``torchvision-detection``: a torchvision detection state dict (``backbone.body.*``,
  ``backbone.fpn.*``), v1 or v2, two-stage (C2..C5, P6 by max pool) or one-stage (C3..C5, P6P7).

Only the backbone+FPN is loaded: extraction never runs a detection head, so head tensors are
reported as not used. Everything else must fit exactly: a missing, unexpected or misshapen tensor
is a PkdError that names them, in the checkpoint's own key names.

Two layouts differ from ours and are converted, not copied:

- MMDetection's PatchMerging gathers the 2x2 neighbours with ``nn.Unfold`` (input channel
  ``c * 4 + 2 * dy + dx``), the original Swin and torchvision concatenate them
  (``[x(0,0), x(1,0), x(0,1), x(1,1)]``, dy first: channel ``k * C + c``); the downsample's
  ``reduction`` weight and ``norm`` parameters are reordered by :func:`unfold_to_concat_order`.
- MMDetection keeps a stage's ``downsample`` at the end of that stage; torchvision has it as its own
  module between stages (``features[2 * stage + 2]``).

Equivalence holds where every Swin stage's map is wider and taller than a window (7 tokens: images
over 224 px a side): on smaller maps torchvision skips the window shift, MMDetection does not.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from pkd_offline.checkpoint import load_checkpoint
from pkd_offline.errors import PkdError
from pkd_offline.models import build_detector
from pkd_offline.models.detector import FeatureDetector
from pkd_offline.models.swin import SWIN_SIZES, TINY_SWIN

FORMATS = ("pkd-offline", "mmdet-swin", "torchvision-detection")
MMDET_HEADS = ("rpn_head", "roi_head", "bbox_head", "mask_head", "semantic_head")
TORCHVISION_HEADS = ("rpn", "roi_heads", "head")
CLASSIFIER_HEADS = ("fc", "classifier")
SWIN_WINDOW = 7
SHOWN = 10  # keys listed per kind of problem in an error message


def unfold_to_concat_order(values: Tensor) -> Tensor:
    """Reorder the last dim (4*C) of a PatchMerging tensor from MMDetection's unfold order to torchvision's.

    MMDetection: index ``c * 4 + k`` with ``k = 2 * dy + dx`` ((0,0),(0,1),(1,0),(1,1)); torchvision:
    ``j * C + c`` with ``j`` over (0,0),(1,0),(0,1),(1,1) as (dy, dx). Works on the ``reduction`` weight
    (2C, 4C) and the ``norm`` weight/bias (4C,); the inverse of MMDetection's ``swin_converter``.
    """
    *lead, width = values.shape
    per_neighbour = values.reshape(*lead, width // 4, 4).transpose(-1, -2)  # (..., k, C)
    return per_neighbour[..., [0, 2, 1, 3], :].reshape(*lead, width)  # k -> j: swap (0,1) and (1,0)


def unwrap_state(content: dict) -> dict:
    """The tensor dict inside a checkpoint: ``state_dict`` (MMDetection), ``model`` (torchvision
    references, timm), or ``content`` itself; a DDP ``module.`` prefix is dropped."""
    for wrapper in ("state_dict", "model"):
        if isinstance(content.get(wrapper), dict):
            content = content[wrapper]
            break
    if content and all(str(k).startswith("module.") for k in content):
        content = {k[len("module."):]: v for k, v in content.items()}
    return content


def detect_checkpoint_format(content: dict, source: Path | str) -> str:
    """One of ``FORMATS`` for a loaded teacher checkpoint; a PkdError says what it is if unusable."""
    if "spec" in content and "model" in content:
        return "pkd-offline"
    keys = [str(k) for k in unwrap_state(content)]
    if any(k.startswith(("backbone.stages.", "backbone.patch_embed.")) for k in keys):
        return "mmdet-swin"
    if any(k.startswith("backbone.body.") for k in keys):
        return "torchvision-detection"
    if any(k.startswith("neck.") for k in keys):
        raise PkdError(f"checkpoint {source} is an MMDetection detector whose backbone is not a Swin: only the "
                       f"Swin teachers (swin, swin_s, swin_b) are mapped; for ResNet-50 pass a torchvision detection state dict")
    if "conv1.weight" in keys or any(k.startswith("features.") for k in keys):
        raise PkdError(f"checkpoint {source} holds ImageNet classification weights (no FPN): a teacher needs a "
                       f"detector's backbone+FPN; pass these to a student with --backbone-weights")
    raise PkdError(f"checkpoint {source} is not a format a teacher loads (pkd-offline model.pt, MMDetection Swin "
                   f"checkpoint, torchvision detection state dict): its keys begin {keys[:3]}")


def load_foreign_teacher(name: str, content: dict, checkpoint_format: str, *, num_classes: int,
                         source: Path | str) -> tuple[FeatureDetector, dict[str, int]]:
    """Build teacher ``name`` and load the backbone+FPN of a ``mmdet-swin`` or ``torchvision-detection``
    checkpoint into it. Returns the model and the unused (detection head) tensors counted by top-level
    module, e.g. ``{"roi_head": 38, "rpn_head": 6}``. The variant comes from the checkpoint's shapes.
    The detection head of the returned model is random: use it for features only."""
    state = unwrap_state(content)
    if checkpoint_format == "mmdet-swin":
        variant = _swin_variant(name, state, source)
        model = build_detector(name, num_classes=num_classes, variant=variant)
        unused = fit_state(model.detector.backbone, state, _mmdet_name, source=source, what=f"the {name} backbone+FPN",
                           ignorable=MMDET_HEADS, converters=_MMDET_CONVERTERS,
                           optional=lambda key: key.endswith("relative_position_index"))
    elif checkpoint_format == "torchvision-detection":
        if name != "resnet50":
            raise PkdError(f"checkpoint {source} is a torchvision ResNet-50 detector, not a {name!r}: pass --teacher resnet50")
        model = _torchvision_layout_teacher(state, num_classes=num_classes)
        unused = fit_state(model.detector.backbone, state, lambda key: "backbone." + key, source=source,
                           what="the resnet50 backbone+FPN", ignorable=TORCHVISION_HEADS, optional=_frozen_bn_buffer)
    else:
        raise PkdError(f"unknown checkpoint format {checkpoint_format!r}: choose one of {', '.join(FORMATS)}")
    return model, dict(sorted(Counter(key.split(".")[0] for key in unused).items()))


def load_backbone_weights(model: FeatureDetector, path: Path | str) -> list[str]:
    """Load ImageNet classification weights (torchvision format: ``conv1.weight``, ``layer1.0...``, or
    ``features.N...`` for MobileNetV3) from ``path`` (a file or URL, e.g. torchvision's
    ``https://download.pytorch.org/models/resnet50-0676ba61.pth``) into ``model.detector.backbone.body``.

    The backbone's batch norms are frozen afterwards (statistics and affine terms). Shapes are
    checked and every body tensor must be present (``num_batches_tracked`` excepted: older
    files lack it). Returns the checkpoint keys not loaded (classifier ``fc.*``/``classifier.*``, and
    MobileNet layers past the last one the FPN uses). PkdError when the weights do not fit.
    """
    content = _load_weights(path)
    state = unwrap_state(content)
    body = model.detector.backbone.body
    prefix = "features." if any(str(k).startswith("features.") for k in state) else ""
    last_layer = max((int(k.split(".")[0]) for k in body.state_dict() if k.split(".")[0].isdigit()), default=-1)

    def beyond_body(key: str) -> bool:  # MobileNet blocks after the deepest one the FPN reads
        parts = key.split(".")
        return prefix == "features." and parts[0] == "features" and parts[1].isdigit() and int(parts[1]) > last_layer

    ignored = fit_state(body, state, lambda key: prefix + key, source=path, what=f"the {model.spec.get('backbone')} "
                        f"backbone of {model.spec['name']} ({model.spec['variant']})", ignorable=CLASSIFIER_HEADS,
                        optional=_frozen_bn_buffer, ignore=beyond_body)
    # Pretrained backbones keep their ImageNet normalisation statistics, as torchvision's and
    # MMDetection's detectors do (FrozenBatchNorm / norm_eval): small per-GPU batches would spoil them.
    model.spec["frozen_backbone_norm"] = True
    model.freeze_backbone_norm()
    return ignored


def fit_state(target: nn.Module, state: dict, their_name: Callable[[str], str], *, source: Path | str, what: str,
              ignorable: tuple[str, ...] = (), optional: Callable[[str], bool] = lambda key: False,
              ignore: Callable[[str], bool] = lambda key: False,
              converters: tuple[tuple[str, Callable[[str, Tensor, Tensor], Tensor]], ...] = ()) -> list[str]:
    """Copy ``state`` into every tensor of ``target`` (``their_name`` maps our key to the checkpoint's).

    A checkpoint key no target key maps to is unused when its top-level module is in ``ignorable`` or
    ``ignore(key)`` holds, and an error otherwise; a target key may be absent only if ``optional``.
    ``converters`` (suffix, fn(their_key, value, ours) -> value) rewrite values of matching keys.
    Returns the unused keys, sorted; PkdError listing missing, unexpected and misshapen keys.
    """
    ours = target.state_dict()
    wanted = {their_name(key): key for key in ours}
    missing = [theirs for theirs, key in wanted.items() if theirs not in state and not optional(key)]
    unused = sorted(k for k in state if k not in wanted and (str(k).split(".")[0] in ignorable or ignore(str(k))))
    unexpected = sorted(str(k) for k in state if k not in wanted and k not in unused)
    loaded, misshapen = {}, []
    for theirs, key in wanted.items():
        if theirs not in state:
            continue
        value = state[theirs]
        if not isinstance(value, Tensor):
            unexpected.append(f"{theirs} (not a tensor)")
            continue
        for suffix, convert in converters:
            if theirs.endswith(suffix):
                value = convert(theirs, value, ours[key])
        if value.shape != ours[key].shape:
            misshapen.append(f"{theirs} {tuple(value.shape)} (expected {tuple(ours[key].shape)})")
            continue
        loaded[key] = value
    if missing or unexpected or misshapen:
        problems = [f"{len(keys)} {label}: {', '.join(keys[:SHOWN])}{', ...' if len(keys) > SHOWN else ''}"
                    for label, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen))
                    if keys]
        raise PkdError(f"checkpoint {source} does not fit {what}: {'; '.join(problems)}")
    target.load_state_dict({**ours, **loaded})
    return unused


# --- MMDetection Swin --------------------------------------------------------------------------------

_MMDET_BLOCK = {"attn.qkv": "attn.w_msa.qkv", "attn.proj": "attn.w_msa.proj",
                "attn.relative_position_bias_table": "attn.w_msa.relative_position_bias_table",
                "attn.relative_position_index": "attn.w_msa.relative_position_index",
                "mlp.0": "ffn.layers.0.0", "mlp.3": "ffn.layers.1"}


def _mmdet_name(key: str) -> str:
    """Our SwinFPN key (``detector.backbone`` state) -> the MMDetection checkpoint's key."""
    if match := re.fullmatch(r"body\.features\.0\.([02])\.(\w+)", key):
        return f"backbone.patch_embed.{'projection' if match[1] == '0' else 'norm'}.{match[2]}"
    if match := re.fullmatch(r"body\.features\.(\d+)\.(\d+)\.(.+)", key):  # block M of stage N // 2
        rest = match[3]
        for ours, theirs in _MMDET_BLOCK.items():
            if rest == ours or rest.startswith(ours + "."):
                rest = theirs + rest[len(ours):]
                break
        return f"backbone.stages.{int(match[1]) // 2}.blocks.{match[2]}.{rest}"
    if match := re.fullmatch(r"body\.features\.(\d+)\.(reduction|norm)\.(\w+)", key):  # merging after stage k
        return f"backbone.stages.{int(match[1]) // 2 - 1}.downsample.{match[2]}.{match[3]}"
    if match := re.fullmatch(r"body\.norms\.(\d+)\.(\w+)", key):
        return f"backbone.norm{match[1]}.{match[2]}"
    if match := re.fullmatch(r"fpn\.(inner|layer)_blocks\.(\d+)\.0\.(\w+)", key):
        return f"neck.{'lateral' if match[1] == 'inner' else 'fpn'}_convs.{match[2]}.conv.{match[3]}"
    return key  # unmapped: reported as missing under our own name


def _relative_position_index(theirs: str, value: Tensor, ours: Tensor) -> Tensor:
    """MMDetection stores the (49, 49) index buffer; it must equal ours (flattened), which is kept."""
    if value.numel() != ours.numel() or not torch.equal(value.reshape(-1).to(ours.dtype), ours):
        raise PkdError(f"{theirs} differs from torchvision's relative position index: the checkpoint's "
                       f"attention layout is not Swin's (window {SWIN_WINDOW})")
    return ours


_MMDET_CONVERTERS = (
    ("downsample.reduction.weight", lambda theirs, value, ours: unfold_to_concat_order(value)),
    ("downsample.norm.weight", lambda theirs, value, ours: unfold_to_concat_order(value)),
    ("downsample.norm.bias", lambda theirs, value, ours: unfold_to_concat_order(value)),
    ("relative_position_index", _relative_position_index),
)


def swin_size(state: dict) -> tuple[int, tuple[int, ...], tuple[int, ...], int]:
    """(embed_dim, depths, num_heads, window) of the Swin in an MMDetection state dict, from its shapes."""
    try:
        embed_dim = state["backbone.patch_embed.projection.weight"].shape[0]
        blocks = Counter()
        for key in state:
            if match := re.match(r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.", key):
                blocks[int(match[1])] = max(blocks[int(match[1])], int(match[2]) + 1)
        depths = tuple(blocks[s] for s in range(max(blocks) + 1))
        tables = [state[f"backbone.stages.{s}.blocks.0.attn.w_msa.relative_position_bias_table"] for s in range(len(depths))]
    except (KeyError, ValueError, AttributeError) as error:
        raise PkdError(f"MMDetection Swin checkpoint lacks {error}: it is incomplete") from None
    window = (round(tables[0].shape[0] ** 0.5) + 1) // 2
    return embed_dim, depths, tuple(t.shape[1] for t in tables), window


def _swin_variant(name: str, state: dict, source: Path | str) -> str:
    """``full`` or ``tiny``: the builder variant whose sizes equal the checkpoint's; PkdError otherwise."""
    embed_dim, depths, heads, window = swin_size(state)
    found = (embed_dim, depths, heads)
    described = f"embed {embed_dim}, depths {list(depths)}, heads {list(heads)}, window {window}"
    if window != SWIN_WINDOW:
        raise PkdError(f"checkpoint {source} holds a Swin with window {window} ({described}): only window "
                       f"{SWIN_WINDOW} is built")
    if name not in SWIN_SIZES:
        raise PkdError(f"checkpoint {source} holds a Swin backbone ({described}), not a {name!r}: pass --teacher "
                       f"{' or '.join(n for n, size in SWIN_SIZES.items() if size == found) or 'swin'}")
    if found == SWIN_SIZES[name]:
        return "full"
    if found == TINY_SWIN:
        return "tiny"
    fitting = [n for n, size in SWIN_SIZES.items() if size == found]
    hint = f"pass --teacher {fitting[0]}" if fitting else f"known sizes: {SWIN_SIZES}"
    raise PkdError(f"checkpoint {source} holds a Swin with {described}, not the {name} teacher's: {hint}")


# --- torchvision detection ---------------------------------------------------------------------------

def _frozen_bn_buffer(key: str) -> bool:
    """FrozenBatchNorm2d (torchvision v1 detectors) and old ImageNet files have no num_batches_tracked."""
    return key.endswith("num_batches_tracked")


def _torchvision_layout_teacher(state: dict, *, num_classes: int) -> FeatureDetector:
    """A resnet50 teacher shaped like the checkpoint's FPN: C2..C5 + max-pool P6 (Faster/Mask R-CNN,
    P2..P6) or C3..C5 + P6P7 from C5 (v2) or P5 (v1) (RetinaNet, FCOS, P3..P7), BatchNorm in the FPN
    for the v2 models. The body is torchvision's ResNet-50 either way."""
    inputs = sorted({int(m[1]) for k in state if (m := re.match(r"backbone\.fpn\.inner_blocks\.(\d+)\.", k))})
    if len(inputs) not in (3, 4):
        raise PkdError(f"torchvision checkpoint has an FPN over {len(inputs)} inputs: only C2..C5 or C3..C5 are built")
    if len(inputs) == 4:
        model = build_detector("resnet50", num_classes=num_classes, variant="full")
        extra: nn.Module = LastLevelMaxPool()
    else:
        p6 = state.get("backbone.fpn.extra_blocks.p6.weight")
        if p6 is None:
            raise PkdError("torchvision checkpoint has an FPN over C3..C5 without P6/P7 blocks: not a layout we build")
        model = build_detector("retinanet", num_classes=num_classes, variant="full", backbone="resnet50")
        model.spec["name"] = "resnet50"
        extra = LastLevelP6P7(p6.shape[1], p6.shape[0])  # in 2048: from C5 (v2); 256: from P5 (v1)
    in_channels = [256 * 2 ** i for i in range(4)][4 - len(inputs):]
    norm = nn.BatchNorm2d if "backbone.fpn.inner_blocks.0.1.weight" in state else None
    backbone = model.detector.backbone
    backbone.fpn = FeaturePyramidNetwork(in_channels, backbone.out_channels, extra_blocks=extra, norm_layer=norm)
    return model


def _load_weights(path: Path | str) -> dict:
    """A weights file or URL (fetched into torch.hub's cache) read with ``torch.load(weights_only=True)``."""
    return load_checkpoint(path, what="weights file", missing_hint="pass an existing file or its URL "
                           "(https://, s3://, file://; see docs/coco-recipe.md)")
