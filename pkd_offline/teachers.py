"""Loading a teacher for extraction, online distillation and verification, from a weights path or URL."""

from __future__ import annotations

from pathlib import Path

import torch

from pkd_offline.checkpoint import detector_from_checkpoint, load_checkpoint
from pkd_offline.data import file_sha256
from pkd_offline.errors import PkdError
from pkd_offline.models import DETECTORS, FeatureDetector, build_detector
from pkd_offline.models.foreign_weights import detect_checkpoint_format, load_foreign_teacher
from pkd_offline.weights_source import fetch_weights, is_url


def load_teacher(name: str, *, checkpoint: Path | str | None, random_init: bool, variant: str, num_classes: int,
                 seed: int = 0) -> tuple[FeatureDetector, dict]:
    """The teacher in eval mode, frozen, and its identity for a store manifest.

    Identity: {"name", "variant", "checkpoint_sha256", "checkpoint_format"} (plus "checkpoint_unused",
    head tensors counted by module, for foreign checkpoints, and "checkpoint_url" when ``checkpoint``
    is a URL, fetched into torch.hub's cache by ``pkd_offline.weights_source``; the sha256 is the
    full digest of the file loaded) or {"name", "variant", "random_init_seed"}.
    The checkpoint's format is recognised from its keys (``pkd_offline.models.foreign_weights``): a
    project checkpoint rebuilds its own architecture, which must be ``name``; an MMDetection Swin or a
    torchvision detection checkpoint is loaded into ``name``'s backbone+FPN. Either way the variant
    comes from the checkpoint, not from ``variant``.
    """
    if name not in DETECTORS:
        raise PkdError(f"unknown teacher {name!r}: choose one of {', '.join(DETECTORS)}")
    if checkpoint is not None:
        local = fetch_weights(checkpoint)
        content = load_checkpoint(local)  # errors name the cached file of a URL: the one to delete
        checkpoint_format = detect_checkpoint_format(content, checkpoint)
        unused: dict[str, int] = {}
        if checkpoint_format == "pkd-offline":
            teacher = detector_from_checkpoint(content, checkpoint)
            if teacher.spec["name"] != name:
                raise PkdError(f"checkpoint {checkpoint} holds a {teacher.spec['name']!r} model, not {name!r}: "
                               f"pass --teacher {teacher.spec['name']}")
        else:
            teacher, unused = load_foreign_teacher(name, content, checkpoint_format, num_classes=num_classes,
                                                   source=checkpoint)
        identity = {"name": name, "variant": teacher.spec["variant"], "checkpoint_sha256": file_sha256(local),
                    "checkpoint_format": checkpoint_format}
        if is_url(checkpoint):
            identity["checkpoint_url"] = str(checkpoint)
        if unused:
            identity["checkpoint_unused"] = unused
    elif random_init:
        torch.manual_seed(seed)
        teacher = build_detector(name, num_classes=num_classes, variant=variant)
        identity = {"name": name, "variant": variant, "random_init_seed": seed}
    else:
        raise PkdError(f"teacher {name!r} needs weights: pass --checkpoint FILE (or --random-init for a smoke test)")
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher, identity
