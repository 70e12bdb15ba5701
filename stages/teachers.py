"""Loading a teacher for extraction, online distillation and verification; no weights are downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

from pkd_offline.checkpoint import load_checkpoint, load_detector
from pkd_offline.data import file_sha256
from pkd_offline.errors import PkdError
from pkd_offline.models import DETECTORS, FeatureDetector, build_detector


def load_teacher(name: str, *, checkpoint: Path | None, random_init: bool, variant: str, num_classes: int,
                 seed: int = 0) -> tuple[FeatureDetector, dict]:
    """The teacher in eval mode, frozen, and its identity for a store manifest.

    Identity: {"name", "variant", "checkpoint_sha256" or "random_init_seed"}. A project checkpoint
    (``pkd-offline train`` output) rebuilds its own architecture, which must be ``name``.
    """
    if name not in DETECTORS:
        raise PkdError(f"unknown teacher {name!r}: choose one of {', '.join(DETECTORS)}")
    if checkpoint is not None:
        content = load_checkpoint(checkpoint)
        if "spec" in content:
            teacher, _ = load_detector(checkpoint)
            if teacher.spec["name"] != name:
                raise PkdError(f"checkpoint {checkpoint} holds a {teacher.spec['name']!r} model, not {name!r}: "
                               f"pass --teacher {teacher.spec['name']}")
        else:
            raise PkdError(f"checkpoint {checkpoint} is not a pkd-offline model checkpoint")
        identity = {"name": name, "variant": teacher.spec["variant"], "checkpoint_sha256": file_sha256(checkpoint)}
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
