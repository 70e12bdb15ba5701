"""Shard writer threads: a shard is written once all its samples arrived, several shards at once, while the
teacher runs on."""

from __future__ import annotations

import queue
import threading
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor

from pkd_offline.distributed import half_the_cpus
from storage import Manifest, Sample


def default_writer_threads() -> int:
    """Shards written at once: half the CPUs (the loader's workers decode images on the rest), 1 to 8."""
    return half_the_cpus()


class ShardWriterThread(threading.Thread):
    """Collects samples from a bounded queue and, once all of a shard's samples arrived, hands the shard
    to a pool of ``writers`` threads (compression releases the GIL), so encoding and writing overlap the
    next teacher forwards and each other. At most ``writers`` shards are in flight: the queue then fills
    and the forward waits, which bounds memory. ``written``: shards written."""

    def __init__(self, writer, manifest: Manifest, maxsize: int = 64, writers: int = 1) -> None:
        super().__init__(daemon=True)
        self.writer, self.manifest = writer, manifest
        self.inbox: queue.Queue = queue.Queue(maxsize=maxsize)
        self.pending: dict[int, dict[int, Sample]] = defaultdict(dict)
        self.error: BaseException | None = None
        self.written = 0
        self.writers = max(1, writers)
        self.pool = ThreadPoolExecutor(self.writers, thread_name_prefix="shard-writer")
        self.in_flight: deque[Future] = deque()

    def run(self) -> None:
        while (sample := self.inbox.get()) is not None:
            if self.error is not None:
                continue
            try:
                k = sample.index // self.manifest.samples_per_shard
                self.pending[k][sample.index] = sample
                expected = self.manifest.shard_range(k)
                if len(self.pending[k]) == len(expected):
                    samples = self.pending.pop(k)
                    while len(self.in_flight) >= self.writers:
                        self._collect(self.in_flight.popleft())
                    self.in_flight.append(self.pool.submit(self.writer.write_shard, k, [samples[i] for i in expected]))
            except BaseException as error:  # surfaced in the main thread
                self.error = error
        while self.in_flight:
            self._collect(self.in_flight.popleft())
        self.pool.shutdown()

    def _collect(self, future: Future) -> None:
        try:
            future.result()
            self.written += 1
        except BaseException as error:
            self.error = self.error or error

    def put(self, sample: Sample) -> None:
        """Queue ``sample``; waits while the queue is full. Raises the first error a writer met."""
        if self.error is not None:
            raise self.error
        self.inbox.put(sample)

    def close(self) -> None:
        """Write the shards still in flight and stop; raises the first error a writer met."""
        self.inbox.put(None)
        self.join()
        if self.error is not None:
            raise self.error
