"""The device pipeline of extraction: image loading, the teacher's forward, encoding and shard writing overlapped,
as one object with a small interface (like timm's ``PrefetchLoader``) that returns a record of what it did."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

from pkd_offline.extraction.encode import LaunchedBatch, finish
from pkd_offline.extraction.teacher_maps import TeacherMaps
from pkd_offline.extraction.writers import ShardWriterThread
from storage import Manifest, Sample

# Where extraction's main loop spends its time (seconds, by what it waited on): fitting a pca basis on the first
# batches (their teacher forwards included; those batches are then encoded, not run again), waiting for the
# loader's images (after the first batch), launching the teacher forward with its projections and checks,
# launching the encoding and the copy to the host, waiting for the device to finish a batch (on a GPU the next
# batch is launched first, so this is the device's time not hidden behind the host's; on the CPU the work itself
# is in teacher and encode), waiting for a free shard writer (the queue is full), and writing the last shards
# after the last batch.
EXTRACT_PHASES = ("fit", "images", "teacher", "encode", "device", "writers", "last_shards")

Forward = Callable[[list[dict]], TeacherMaps]  # one same-size batch -> its maps (``teacher_levels``, bound)
Encode = Callable[[list[dict], TeacherMaps], LaunchedBatch]  # batch, maps -> launched (``launch_encode``, bound)


@dataclass
class PipelineRecord:
    """What one ``DevicePipeline.run`` did: ``samples`` handed to the shard writers (and written), seconds per
    phase of ``EXTRACT_PHASES`` (``fit`` excepted: the caller's), and ``started``, the ``time.perf_counter()`` the
    run's clock starts at: the one ``run`` was given (a pca fit's start), else the loader's first batch's arrival
    (None if there was neither)."""

    samples: int = 0
    phase_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(EXTRACT_PHASES[1:], 0.0))
    started: float | None = None


class DevicePipeline:
    """Runs ``forward`` and ``encode`` over batches and hands their Samples to shard writer threads.

    A batch is finished (``finish``: waited for, read back, checked) only once the next one is launched, so the
    device stays busy while the host waits; the shards are written by ``writers`` threads
    (``ShardWriterThread``) while the teacher runs on. ``store`` is the store writer (``write_shard``), ``manifest``
    its manifest; ``progress`` is told how many samples each batch handed over.
    """

    def __init__(self, forward: Forward, encode: Encode, store, manifest: Manifest, *, writers: int,
                 progress: Callable[[int], object] | None = None) -> None:
        self.forward, self.encode, self.store, self.manifest = forward, encode, store, manifest
        self.writers, self.progress = writers, progress
        self.pending: deque[LaunchedBatch] = deque()  # at most one: finished once the next is launched
        self.writer_thread: ShardWriterThread | None = None
        self.record = PipelineRecord()

    def run(self, fitted: list[tuple[list[dict], TeacherMaps]], batches: Iterable[list[dict]],
            started: float | None = None) -> PipelineRecord:
        """Encode ``fitted`` (batches whose maps the pca fit kept; emptied), then run ``batches`` (a loader's),
        and write every sample; returns the record. ``started``: when the run's clock started (the fit's start;
        None: at the first batch, so the loader's start-up is not counted). The first error (NaN or Inf maps, a
        codec's range, a failed write) stops it and is raised, the shards already handed over written."""
        self.pending.clear()
        self.record = PipelineRecord(started=started)
        self.writer_thread = ShardWriterThread(self.store, self.manifest, writers=self.writers)
        self.writer_thread.start()
        try:
            while fitted:  # popped, so each batch's maps are freed once encoded
                self._launch(*fitted.pop(0))
            self._run_loader(iter(batches))
            while self.pending:
                self._finish_oldest()
        finally:
            tick = time.perf_counter()
            self.writer_thread.close()
            self.record.phase_seconds["last_shards"] = time.perf_counter() - tick
        return self.record

    def _run_loader(self, batches) -> None:
        phases = self.record.phase_seconds
        while True:
            tick = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                return
            if self.record.started is None:
                self.record.started = time.perf_counter()  # start-up is over
            else:
                phases["images"] += time.perf_counter() - tick
            tick = time.perf_counter()
            maps = self.forward(batch)
            phases["teacher"] += time.perf_counter() - tick
            self._launch(batch, maps)

    def _launch(self, batch: list[dict], maps: TeacherMaps) -> None:
        """Launch ``batch``'s encoding and copy to the host; then finish the previous batch, whose copy is done by
        the time this one's work runs."""
        tick = time.perf_counter()
        self.pending.append(self.encode(batch, maps))
        self.record.phase_seconds["encode"] += time.perf_counter() - tick
        if len(self.pending) > 1:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        tick = time.perf_counter()
        samples = finish(self.pending.popleft(), self.manifest.n_views)
        self.record.phase_seconds["device"] += time.perf_counter() - tick
        self._hand_over(samples)

    def _hand_over(self, samples: list[Sample]) -> None:
        """Queue a batch's samples for the shard writers (timed: a full queue waits for a free writer)."""
        tick = time.perf_counter()
        for sample in samples:
            self.writer_thread.put(sample)
        self.record.phase_seconds["writers"] += time.perf_counter() - tick
        self.record.samples += len(samples)
        if self.progress is not None:
            self.progress(len(samples))
