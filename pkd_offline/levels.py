"""Pairing of student and teacher pyramid levels (``--level-map``).

``index``: the official PKD configs' pairing, the teacher's levels in order against the student's in
order (for a Swin Mask R-CNN teacher P2..P6 and a RetinaNet student P3..P7: teacher P2..P5 against
student P3..P6); the student map is resized to the teacher's size in the loss.
``stride``: levels of equal stride only.
"""

from __future__ import annotations

from pkd_offline.errors import PkdError

LEVEL_MAPS = ("index", "stride")


def pair_levels(student_strides: list[int], teacher_strides: list[int], level_map: str) -> list[tuple[int, int]]:
    """Return (student_stride, teacher_stride) pairs, strides in pixels, in increasing order."""
    student_strides, teacher_strides = sorted(student_strides), sorted(teacher_strides)
    if level_map == "index":
        pairs = list(zip(student_strides, teacher_strides))
    elif level_map == "stride":
        pairs = [(s, s) for s in student_strides if s in teacher_strides]
    else:
        raise PkdError(f"unknown level map {level_map!r}: choose one of {', '.join(LEVEL_MAPS)}")
    if not pairs:
        raise PkdError(
            f"no teacher level pairs with the student's (student strides {student_strides}, "
            f"teacher strides {teacher_strides}, --level-map {level_map})"
        )
    return pairs


def teacher_strides_needed(student_strides: list[int], teacher_strides: list[int], level_map: str,
                           max_pairs: int | None = None) -> list[int]:
    """The teacher strides a store must hold for this pairing (the first ``max_pairs`` pairs)."""
    pairs = pair_levels(student_strides, teacher_strides, level_map)
    return [t for _, t in pairs[:max_pairs]]
