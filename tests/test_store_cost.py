"""benchmarks/store_cost.py: the store figures of issue 11's targets, on tiny projected stores of real extractions."""

from __future__ import annotations

import pytest
import torch

from benchmarks.store_cost import decode_rate, grad_cosine, store_bytes
from pkd_offline.models import build_detector
from stages.extract import ExtractConfig, extract


@pytest.fixture(scope="module")
def stores(synth_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("cost")
    settings = dict(teacher="swin", random_init=True, variant="tiny", data=synth_data, split="train", views=1,
                    short_side=128, max_size=128, batch_size=4, workers=0, samples_per_shard=4, progress=False,
                    levels="2,3,4,5", layout="projected", student_levels="3,4,5,6")
    return {codec: extract(ExtractConfig(out=root / f"{codec}.zarr", codec=codec, **settings))
            for codec in ("fp32", "int8", "int2")}


def test_bytes_count_the_codec_alone_and_the_whole_store_against_full_fp32_maps(stores):
    fp32, int8 = store_bytes(stores["fp32"]), store_bytes(stores["int8"])
    assert 0.85 < fp32["bytes_ratio_default_codec_over_fp32"] <= 1.02  # zstd finds little in fp32 mantissas
    assert 0.2 < int8["bytes_ratio_default_codec_over_fp32"] < 0.32
    # The projected layout holds about a quarter of the teacher's values (plus a row and column, and its sums).
    assert 0.15 < fp32["index_store_bytes_over_fp32_maps"] < 0.45
    assert int8["index_store_bytes_over_fp32_maps"] < 0.4 * fp32["index_store_bytes_over_fp32_maps"]
    assert int8["codec"] == "int8" and int8["layout"] == "projected"


def test_grad_cosine_is_one_against_itself_and_falls_with_fewer_bits(synth_data, stores):
    torch.manual_seed(0)
    student = build_detector("retinanet", num_classes=7, variant="tiny", backbone="resnet18").eval()
    device = torch.device("cpu")
    assert grad_cosine(synth_data, stores["fp32"], stores["fp32"], student, 4, device) == pytest.approx(1.0, abs=1e-9)
    int8 = grad_cosine(synth_data, stores["int8"], stores["fp32"], student, 4, device)
    int2 = grad_cosine(synth_data, stores["int2"], stores["fp32"], student, 4, device)
    assert 0.999 < int8 < 1.0 and int2 < int8


def test_decode_rate_counts_every_sample(stores):
    assert decode_rate(stores["int8"], workers=0, rounds=1) > 0
