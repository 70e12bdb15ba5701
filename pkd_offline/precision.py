"""The precision detector forwards run in, one policy for extraction, verification, the online teacher and the
training step: bf16 autocast on CUDA, float32 elsewhere."""

from __future__ import annotations

import torch

# Device types on which the teacher runs under bf16 autocast. verify recomputes in the same precision, since bf16
# and float32 maps of a Swin-S differ at r ~ 0.9999, the fp16 codec's own threshold.
AUTOCAST_DEVICE_TYPES = ("cuda",)


def forward_autocast(device: torch.device | str) -> torch.autocast:
    """The autocast context a forward (teacher or student) runs under on ``device``: bf16 on the types in
    ``AUTOCAST_DEVICE_TYPES`` (CUDA), disabled (float32) elsewhere."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type in AUTOCAST_DEVICE_TYPES)
