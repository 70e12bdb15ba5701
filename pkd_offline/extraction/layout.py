"""What a store holds per level: the strides kept, the arrays' largest shapes, and the projected layout."""

from __future__ import annotations

from pkd_offline.data import CocoDetection
from pkd_offline.errors import PkdError
from pkd_offline.projection import RESIZE, projection_is_exact
from pkd_offline.pyramid import level_size
from pkd_offline.views import View, view_padded_size
from storage import LevelSpec
from storage.manifest import LAYOUTS



def parse_level_numbers(levels: str, flag: str, example: str) -> list[int]:
    """Strides (px) of comma-separated pyramid level numbers like "2,3,4,5" (P2 = stride 4), sorted; PkdError
    naming ``flag`` if they are not numbers."""
    try:
        return sorted(2 ** int(level) for level in str(levels).split(","))
    except ValueError:
        raise PkdError(f"{flag} {levels!r} must be comma-separated level numbers like {example}") from None


def parse_levels(levels: str | None, teacher_strides: tuple[int, ...]) -> list[int]:
    """Strides (px) to keep from ``--levels`` like "2,3,4,5" (default: all of the teacher's)."""
    if levels is None:
        return list(teacher_strides)
    strides = parse_level_numbers(levels, "--levels", "2,3,4,5")
    unknown = [s for s in strides if s not in teacher_strides]
    if unknown:
        have = ",".join(str(s.bit_length() - 1) for s in teacher_strides)
        raise PkdError(f"--levels {levels}: the teacher has levels {have} only")
    return strides


def level_specs(dataset: CocoDetection, views: list[View], strides: list[int], channels: int,
                projected: dict[int, int] | None = None) -> list[LevelSpec]:
    """Per stride, the largest map (h, w) any (image, view) gives: the zarr arrays' shape. A stride in
    ``projected`` (teacher stride -> student stride) holds the projection: the student's map plus one."""
    projected = projected or {}
    largest = (0, 0)
    for image_id in dataset.image_ids:
        for view in views:
            hw = view_padded_size(*dataset.original_hw(image_id), view)
            largest = (max(largest[0], hw[0]), max(largest[1], hw[1]))
    specs = []
    for s in strides:
        if s in projected:
            height, width = level_size(largest, projected[s])
            specs.append(LevelSpec(s, channels, height + 1, width + 1))
        else:
            specs.append(LevelSpec(s, channels, *level_size(largest, s)))
    return specs


def store_layout(layout: str, student_levels: str | None, strides: list[int], size_divisor: int) -> dict:
    """The manifest's layout: full maps, or for ``projected`` the index pairing of ``strides`` (the teacher's,
    px) with ``student_levels`` (level numbers like "3,4,5,6") and the teacher strides stored as their projection
    (exact 2x pairs whose student stride divides ``size_divisor``, px; the others keep the full map)."""
    if layout not in LAYOUTS:
        raise PkdError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if layout == "full":
        if student_levels is not None:
            raise PkdError("--student-levels is for --layout projected only")
        return {"name": "full"}
    if student_levels is None:
        raise PkdError("--layout projected needs --student-levels, the student levels it serves (e.g. 3,4,5,6)")
    student = parse_level_numbers(student_levels, "--student-levels", "3,4,5,6")
    if len(student) != len(strides):
        raise PkdError(f"--layout projected pairs levels by index: {len(strides)} teacher levels but "
                       f"{len(student)} student levels ({student_levels})")
    pairs = [[s, t] for s, t in zip(student, strides)]
    projected = [t for s, t in pairs if projection_is_exact(s, t, size_divisor)]
    if not projected:
        raise PkdError(f"--layout projected: no pair {pairs} has a student stride twice the teacher's dividing "
                       f"--size-divisor {size_divisor}; use --layout full")
    return {"name": "projected", "pairing": "index", "pairs": pairs, "projected": projected, "resize": RESIZE,
            "size_divisor": size_divisor}


def projected_strides(layout: dict) -> dict[int, int]:
    """{teacher stride: student stride} of the strides ``layout`` (``store_layout``) stores as projections."""
    return {t: s for s, t in layout.get("pairs", []) if t in layout.get("projected", [])}
