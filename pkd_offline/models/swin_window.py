"""Where this project's Swin (torchvision's) and MMDetection's differ: inputs so small that a stage's map fits
in one attention window.

torchvision's ``ShiftedWindowAttention`` drops the window shift along a side whose map is no larger than
the window (7 tokens); MMDetection's Swin always shifts. Stage 4 runs at stride 32, so the two agree only
where both padded sides of the input are over 7 x 32 = 224 px. COCO at short side 800 never meets this;
small images (and the synthetic demo set) do.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

SWIN_WINDOW_PX = 7 * 32  # the window (7 tokens) at the last stage's stride (32 px)


def small_input_warning(identity: dict, padded_sizes: Iterable[tuple[int, int]]) -> str | None:
    """One warning line if an MMDetection Swin teacher (``identity["checkpoint_format"] == "mmdet-swin"``)
    will see inputs whose padded height or width (px) is ``SWIN_WINDOW_PX`` or less; else None."""
    if identity.get("checkpoint_format") != "mmdet-swin":
        return None
    sizes = list(padded_sizes)
    small = [hw for hw in sizes if min(hw) <= SWIN_WINDOW_PX]
    if not small:
        return None
    smallest = min(small, key=lambda hw: hw[0] * hw[1])
    return (f"pkd-offline: warning: {len(small)} of {len(sizes)} inputs have a padded side of {SWIN_WINDOW_PX} px "
            f"or less (smallest {smallest[1]}x{smallest[0]} px): on them this MMDetection Swin teacher's maps differ "
            f"from MMDetection's own (torchvision's Swin skips the window shift where a stage's map fits one "
            f"window; see docs/coco-recipe.md)")


def warn_small_inputs(identity: dict, padded_sizes: Iterable[tuple[int, int]]) -> None:
    """Print :func:`small_input_warning`'s line to stderr, once, if there is one."""
    line = small_input_warning(identity, padded_sizes)
    if line:
        print(line, file=sys.stderr)
