"""The record of one extraction process: counts, wall seconds, seconds per phase, rates and CUDA graph captures;
written as JSON (``--record FILE``) and the source of the summary lines on stderr."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from pkd_offline.extraction.pipeline import EXTRACT_PHASES
from pkd_offline.errors import PkdError


@dataclass
class ExtractionResult:
    """What one extraction process did. Counts are samples (image x view) unless named otherwise.

    ``out``: the store's path or URL; ``samples``: written by this process; ``images``: distinct images among
    them; ``samples_total``: in the store once finished; ``resumed_samples``: found already written in the store
    at the start (a resumed run's finished shards, every rank's); ``seconds``: wall seconds from the start of the
    work (the pca fit's start, else the first batch's arrival) to the last shard written; ``fit_seconds``: of
    them, the pca basis fit (0 if none); ``fit_samples``: this process's samples whose maps came from the fit;
    ``phase_seconds``: {phase of ``EXTRACT_PHASES``: seconds the main loop spent in it}, summing to at most
    ``seconds``; ``samples_per_second``: ``samples / seconds``; ``steady_samples_per_second``: the samples past
    the fit over the seconds past it (None when no sample came after the fit); ``rank`` of ``world_size``: this
    process (torchrun); ``cuda_graphs``: whether the teacher's backbone+FPN ran through CUDA graphs;
    ``cuda_graph_captures`` and ``cuda_graph_capture_seconds``: graphs captured (within the fit and teacher phases);
    ``cuda_graph_failure``: why capture was abandoned (None if it was not).
    """

    out: str
    samples: int
    images: int
    samples_total: int
    resumed_samples: int
    seconds: float
    fit_seconds: float
    fit_samples: int
    phase_seconds: dict[str, float]
    samples_per_second: float
    steady_samples_per_second: float | None
    rank: int = 0
    world_size: int = 1
    cuda_graphs: bool = False
    cuda_graph_captures: int = 0
    cuda_graph_capture_seconds: float = 0.0
    cuda_graph_failure: str | None = None

    @classmethod
    def of(cls, *, out: str, samples: int, images: int, samples_total: int, resumed_samples: int, seconds: float,
           fit_seconds: float, fit_samples: int, phase_seconds: dict[str, float], rank: int = 0, world_size: int = 1,
           backbone=None) -> ExtractionResult:
        """The record, its rates derived from the counts and seconds; ``backbone``: the ``GraphedForward`` the
        teacher ran through (None: no graphs)."""
        steady_samples, steady_seconds = samples - fit_samples, seconds - fit_seconds
        return cls(out=out, samples=samples, images=images, samples_total=samples_total,
                   resumed_samples=resumed_samples, seconds=seconds, fit_seconds=fit_seconds, fit_samples=fit_samples,
                   phase_seconds={name: phase_seconds.get(name, 0.0) for name in EXTRACT_PHASES},
                   samples_per_second=samples / seconds if seconds > 0 else 0.0,
                   steady_samples_per_second=steady_samples / steady_seconds
                   if steady_samples > 0 and steady_seconds > 0 else None,
                   rank=rank, world_size=world_size, cuda_graphs=backbone is not None,
                   cuda_graph_captures=getattr(backbone, "captures", 0),
                   cuda_graph_capture_seconds=getattr(backbone, "capture_seconds", 0.0),
                   cuda_graph_failure=getattr(backbone, "failed", None))

    def to_dict(self) -> dict:
        """The record as JSON-safe values."""
        return dataclasses.asdict(self)

    def write(self, path: Path | str) -> None:
        """The record as a JSON object at ``path`` (its folder made); PkdError where it cannot be written."""
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        except OSError as error:
            raise PkdError(f"cannot write the extraction record to {path}: {error.strerror}; the store at "
                           f"{self.out} is complete: pass another --record path") from None

    def summary(self) -> list[str]:
        """The lines extraction prints on stderr: counts, seconds and rates; seconds per phase; graph captures
        when the teacher ran through CUDA graphs."""
        rate = f"{significant(self.samples_per_second)} samples/s in this process"
        if self.fit_samples or self.fit_seconds:
            steady = (f"{significant(self.steady_samples_per_second)} samples/s past it"
                      if self.steady_samples_per_second is not None else "every sample fell within it")
            rate += (f"; of the seconds, the pca fit on {self.fit_samples} samples took {self.fit_seconds:.3f} s, "
                     f"{steady}")
        lines = [f"extract: {self.samples} samples in {self.seconds:.3f} s from the first batch to the last shard "
                 f"written ({rate})",
                 "extract phases: " + ", ".join(f"{name} {value:.3f} s" for name, value in self.phase_seconds.items())]
        if self.cuda_graphs:
            lines.append(f"extract: cuda graphs {self.cuda_graph_captures} captured in "
                         f"{self.cuda_graph_capture_seconds:.3f} s (within the fit and teacher phases)"
                         + (f", not used: {self.cuda_graph_failure}" if self.cuda_graph_failure else ""))
        return lines


def significant(value: float, digits: int = 3) -> str:
    """``value`` with ``digits`` significant digits, in plain notation (0.0456, 12.3, 1234)."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"
