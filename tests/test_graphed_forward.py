"""The teacher replayed from CUDA graphs (pkd_offline/graphed_forward.py).

The CUDA tests run where a GPU is (benchmarks/gpu_check.sh runs this file on the device machine); here, without
one, only the pass-through on other devices runs."""

from __future__ import annotations

import pytest
import torch

from pkd_offline.graphed_forward import GraphedForward, graphed_backbone
from pkd_offline.precision import forward_autocast
from pkd_offline.teachers import load_teacher

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_swin(device: torch.device):
    teacher, _ = load_teacher("swin", checkpoint=None, random_init=True, variant="tiny", num_classes=3, seed=0)
    return teacher.to(device)


def test_off_cuda_the_forward_runs_as_it_is():
    calls = []

    def forward(x):
        calls.append(x.shape)
        return {"0": x * 2}

    graphed = GraphedForward(forward)
    x = torch.arange(6.0).view(1, 1, 2, 3)
    assert torch.equal(graphed(x)["0"], x * 2)
    assert calls == [x.shape] and graphed.captures == 0 and not graphed.graphs
    teacher = tiny_swin(torch.device("cpu"))
    assert graphed_backbone(teacher, torch.device("cpu")) is None
    assert graphed_backbone(teacher, torch.device("cuda"), enabled=False) is None


@cuda
@torch.inference_mode()
def test_replays_equal_the_forward_and_each_result_outlives_the_next_call():
    device = torch.device("cuda")
    teacher = tiny_swin(device)
    backbone = graphed_backbone(teacher, device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    shapes = [(2, 3, 64, 96), (2, 3, 96, 64), (2, 3, 64, 96), (1, 3, 128, 128), (2, 3, 64, 96)]
    inputs = [torch.rand(shape, generator=generator).to(device) for shape in shapes]
    with forward_autocast(device):
        eager = [teacher.detector.backbone(x) for x in inputs]
        graphed = [backbone(x) for x in inputs]
    for expected, got in zip(eager, graphed):  # every result as it was when returned: none was overwritten
        assert list(got) == list(expected)
        for name in expected:
            assert got[name].dtype == expected[name].dtype == torch.bfloat16
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    # 64x96 and 96x64 captured once each; 128x128 grew the shared buffers (both dropped), 64x96 captured again
    assert backbone.captures == 4 and backbone.failed is None
    assert len(backbone.graphs) == 2


@cuda
@torch.inference_mode()
def test_a_forward_that_waits_for_the_device_runs_as_it_is():
    def forward(x):
        scale = float(x.abs().max())  # a copy to the host: cannot be captured
        return {"0": x / scale}

    graphed = GraphedForward(forward)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)).cuda()
    torch.testing.assert_close(graphed(x)["0"], forward(x)["0"])
    assert graphed.failed is not None and not graphed.graphs
    torch.testing.assert_close(graphed(x * 3)["0"], forward(x * 3)["0"])


def test_the_extract_flag_turns_graphs_off_and_they_are_on_by_default():
    from pkd_offline.cli import _flags, build_parser
    from pkd_offline.config import make_config
    from stages.extract import ExtractConfig

    def config(*flags):
        return make_config(ExtractConfig, {}, _flags(build_parser().parse_args(["extract", *flags])))

    assert config().cuda_graphs is True
    assert config("--no-cuda-graphs").cuda_graphs is False
