"""A module's forward replayed from CUDA graphs: one launch per batch instead of one per kernel.

A Swin-S backbone+FPN launches thousands of small kernels per batch. When the host that launches them also runs
loader workers, shard writers and the pinning thread (extraction), Python's launch rate, not the device, sets
the pace. A CUDA graph captured once per input shape replays all of them with one call.

Memory: every graph shares one memory pool for its intermediates, and writes its outputs into buffers shared by
all graphs (views of one flat buffer per output, grown, with every graph dropped, when a larger shape comes), so
a new shape costs its capture time (two forwards) and a little host memory, not another copy of the maps. The
caller gets copies of the outputs, valid after the next call. Extraction pads every batch to its batch size
(``pkd_offline.extraction.teacher_maps.padded_images``), so one graph per padded image size serves a whole run.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

import torch
from torch import Tensor

Forward = Callable[[Tensor], "dict[str, Tensor]"]


def _view(flat: Tensor, shape: torch.Size) -> Tensor:
    """The first ``shape.numel()`` elements of ``flat`` as a tensor of ``shape``."""
    return flat[:shape.numel()].view(shape)


class GraphedForward:
    """``forward`` (a (N, C, H, W) tensor -> a dict of tensors, e.g. a backbone+FPN) on CUDA inputs replayed from a
    graph captured at the first call of each (shape, dtype, autocast setting); elsewhere, or where capture fails
    (said once on stderr), ``forward`` itself. Returns a dict with the same keys and fresh tensors."""

    def __init__(self, forward: Forward) -> None:
        self.forward = forward
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, dict[str, Tensor]]] = {}
        self.buffers: dict[tuple[str, torch.dtype], Tensor] = {}  # (name, dtype) -> flat buffer shared by graphs
        self.pool = None
        self.captures = 0  # graphs captured (a grown buffer drops them all: they are captured again)
        self.capture_seconds = 0.0  # host seconds spent capturing (warm-up run included)
        self.failed: str | None = None

    def __call__(self, x: Tensor) -> dict[str, Tensor]:
        if x.device.type != "cuda" or self.failed is not None:
            return self.forward(x)
        autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        key = (tuple(x.shape), x.dtype, x.device, autocast)
        if key not in self.graphs:
            tick = time.perf_counter()
            try:
                self._capture(x, key, autocast)
                self.capture_seconds += time.perf_counter() - tick
            except RuntimeError as error:  # a forward that cannot be captured (a host sync) runs as it is
                self.failed = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                self._drop_graphs()
                print(f"cuda graphs: capture failed ({self.failed}); the forward runs without them", file=sys.stderr)
                return self.forward(x)
        graph, static_input, static_outputs = self.graphs[key]
        static_input.copy_(x)
        graph.replay()
        return {name: value.clone() for name, value in static_outputs.items()}

    def _buffer(self, name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A view of shape ``shape`` of the shared buffer ``name``; growing it drops every graph (they wrote to the
        old one)."""
        flat = self.buffers.get((name, dtype))
        if flat is None or flat.numel() < shape.numel():
            flat = torch.empty(shape.numel(), dtype=dtype, device=device)
            self.buffers[(name, dtype)] = flat
            self._drop_graphs()
        return _view(flat, shape)

    def _drop_graphs(self) -> None:
        """Forget every graph, and their pool with them (a capture into the pool of dropped graphs trips PyTorch's
        allocator): the next capture starts a new one."""
        self.graphs.clear()
        self.pool = None

    def _capture(self, x: Tensor, key: tuple, autocast: tuple[bool, torch.dtype]) -> None:
        device = x.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # a warm-up run off the capture (lazy initialisation) gives the output shapes
            shapes = {name: (value.shape, value.dtype) for name, value in self.forward(x).items()}
        torch.cuda.current_stream(device).wait_stream(side)
        static_input = self._buffer("\0input", x.shape, x.dtype, device)
        static_outputs = {name: self._buffer(name, shape, dtype, device) for name, (shape, dtype) in shapes.items()}
        static_input.copy_(x)
        graph = torch.cuda.CUDAGraph()
        # autocast's cache of cast weights must stay off while capturing (the cached casts would be freed after)
        with torch.autocast("cuda", enabled=autocast[0], dtype=autocast[1], cache_enabled=False), \
                torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            outputs = self.forward(static_input)
            for name, value in outputs.items():
                static_outputs[name].copy_(value)
        del outputs  # their memory goes back to the shared pool: only the shared buffers outlive a replay
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[key] = (graph, static_input, static_outputs)
        self.captures += 1


def graphed_backbone(model, device: torch.device, enabled: bool = True) -> Forward | None:
    """A ``GraphedForward`` of ``model.detector.backbone`` (a FeatureDetector's backbone+FPN) on a CUDA device when
    ``enabled``; None (the backbone as it is) otherwise."""
    return GraphedForward(model.detector.backbone) if enabled and device.type == "cuda" else None
