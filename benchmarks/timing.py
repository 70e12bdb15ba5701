"""Timing helpers the benchmarks share: a clock that splits a step into named parts, modes interleaved in blocks,
and ratios of medians with a bootstrap interval over blocks.

A ratio's interval comes from the blocks, not the steps: steps within a block share the machine's state
(clocks, caches, other load), blocks of different modes run interleaved, so block ``b`` of one mode and block
``b`` of another saw the same conditions and are resampled together.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import numpy as np
import torch


class Clock:
    """Marks between the parts of one step: CUDA events on the current stream on CUDA (device time between the
    marks, so asynchronous work is counted where the device ran it), ``time.perf_counter`` elsewhere.

    ``start()`` opens a step, ``mark(name)`` closes the part ``name`` (the time since the previous mark), and
    ``parts()`` waits for the device and returns {name: milliseconds} in mark order plus ``step``, their sum."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def _now(self) -> object:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self.marks = [("", self._now())]

    def mark(self, name: str) -> None:
        self.marks.append((name, self._now()))

    def parts(self) -> dict[str, float]:
        if self.cuda:
            self.marks[-1][1].synchronize()
        elapsed = {}
        for (_, before), (name, after) in zip(self.marks, self.marks[1:]):
            elapsed[name] = elapsed.get(name, 0.0) + (
                before.elapsed_time(after) if self.cuda else 1000 * (after - before))
        elapsed["step"] = sum(elapsed.values())
        return elapsed


def interleaved_blocks(steps: dict[str, Callable[[], dict[str, float]]], *, blocks: int, steps_per_block: int
                       ) -> dict[str, list[list[dict[str, float]]]]:
    """Run ``blocks`` rounds of ``steps_per_block`` calls of every mode's ``step`` (which returns its parts in ms,
    e.g. ``Clock.parts``), the modes' order rotated one place each block (no mode always runs first). Returns
    {mode: [block: [step: parts]]}."""
    names = list(steps)
    timed: dict[str, list[list[dict[str, float]]]] = {name: [] for name in names}
    for block in range(blocks):
        for name in names[block % len(names):] + names[:block % len(names)]:
            timed[name].append([steps[name]() for _ in range(steps_per_block)])
    return timed


def block_medians(blocks: list[list[dict[str, float]]], part: str = "step") -> list[float]:
    """Each block's median of ``part`` (ms) over its steps."""
    return [statistics.median(step[part] for step in block) for block in blocks]


def part_medians(blocks: list[list[dict[str, float]]]) -> dict[str, float]:
    """{part: median ms over every timed step of every block} (parts a mode does not have are absent)."""
    steps = [step for block in blocks for step in block]
    return {part: statistics.median(step[part] for step in steps) for part in steps[0]}


def ratio_of_medians(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """median(numerator) / median(denominator): the ratio the benchmarks report, over per-block values."""
    return statistics.median(numerator) / statistics.median(denominator)


def bootstrap_ratio_ci(numerator: Sequence[float], denominator: Sequence[float], *, resamples: int = 2000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``ratio_of_medians`` over blocks: each resample draws block indices
    with replacement (the same indices for both, since block ``b`` of each mode ran side by side) and takes the
    ratio of the medians of the drawn blocks. Returns (low, high) at ``level`` (0.95: the 2.5th and 97.5th
    percentiles). Seeded: the same values give the same interval."""
    top, bottom = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    if top.shape != bottom.shape or top.ndim != 1 or len(top) == 0:
        raise ValueError(f"need two equal-length, non-empty sequences of block values, got {top.shape} and "
                         f"{bottom.shape}")
    draws = np.random.default_rng(seed).integers(0, len(top), size=(resamples, len(top)))
    ratios = np.median(top[draws], axis=1) / np.median(bottom[draws], axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(ratios, [tail, 1 - tail])
    return float(low), float(high)
