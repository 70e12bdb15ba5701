"""Checkpoints: written atomically, read only with ``torch.load(weights_only=True)`` (nothing is unpickled)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pkd_offline.errors import PkdError
from pkd_offline.models import MODEL_OPTIONS, FeatureDetector, build_detector
from pkd_offline.weights_source import fetch_weights


def save_checkpoint(path: Path, content: dict) -> None:
    """Write ``content`` (tensors, dicts, lists, str/int/float) to ``path`` via a temporary file and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(content, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: Path | str, *, what: str = "checkpoint",
                    missing_hint: str = "pass --checkpoint FILE (a model.pt written by `pkd-offline train`)") -> dict:
    """Load a checkpoint or weights file safely; PkdError if it is missing, corrupt or holds anything but plain data.

    ``path`` may be a URL (``https://``, ``s3://``, ``file://``...): it is fetched into torch.hub's cache
    first and hash-checked (:func:`pkd_offline.weights_source.fetch_weights`).
    """
    local = fetch_weights(path)
    if not local.is_file():
        raise PkdError(f"{what} {path} not found: {missing_hint}")
    try:
        content = torch.load(local, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or unsafe files
        raise PkdError(f"{what} {path} cannot be loaded safely: {str(error).splitlines()[0]}") from None
    if not isinstance(content, dict):
        raise PkdError(f"{what} {path} is not a dict of weights")
    return content


def load_detector(path: Path | str) -> tuple[FeatureDetector, dict]:
    """Rebuild the detector a project checkpoint (a path or URL) describes (``spec``) and load its weights."""
    content = load_checkpoint(path)
    return detector_from_checkpoint(content, path), content


def detector_from_checkpoint(content: dict, source: Path | str) -> FeatureDetector:
    """The detector of an already loaded project checkpoint ``content`` (read from ``source``)."""
    if "spec" not in content or "model" not in content:
        raise PkdError(f"checkpoint {source} is not a pkd-offline model (no 'spec'/'model'); for other formats see the README")
    spec = dict(content["spec"])
    model = build_detector(spec["name"], num_classes=spec["num_classes"], variant=spec["variant"], backbone=spec.get("backbone"),
                           **{option: spec[option] for option in MODEL_OPTIONS if option in spec})
    model.spec = spec
    missing, unexpected = model.load_state_dict(content["model"], strict=False)
    if missing or unexpected:
        raise PkdError(f"checkpoint {source} does not fit {spec['name']}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model
