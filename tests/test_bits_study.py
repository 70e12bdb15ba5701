"""The bits study's measurements (benchmarks/bits_study.py) on tiny seeded synthetic maps: an exact codec
measures r = 1 and gradient cosine 1, damage shows in both, and the prototype codecs do what they claim."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.bits_study import (channel_pearson, cosine, default_point, measure, parse_pca_points, pca_codec,
                                   pkd_gradients, store_codec, uniform_bits, unsigned_code_bytes)
from pkd_offline.engine import Distillation
from storage.codecs.pca import zigzag
from storage.pca_basis import fit_level_basis, level_steps

CHANNELS = 6
PAIRS = [(8, 4), (16, 8)]  # index pairing: student P3, P4 against teacher P2, P3
SIZE_DIVISOR = 32


MIXING = np.random.default_rng(1).standard_normal((CHANNELS, 3))  # every map mixes three fields the same way
OFFSET = np.random.default_rng(2).standard_normal((CHANNELS, 1, 1))


def _maps(generator: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """(CHANNELS, h, w) float32: correlated channels (three smooth random fields, mixed by ``MIXING``, offset
    per channel) plus a little independent noise."""
    field = np.cumsum(np.cumsum(generator.standard_normal((3, *hw)), axis=1), axis=2) / 4
    noise = 0.1 * generator.standard_normal((CHANNELS, *hw))
    return (np.einsum("ck,khw->chw", MIXING, field) + noise + OFFSET).astype(np.float32)


@pytest.fixture
def study_batches():
    """Two batches of three items (images 64x64 or 64x48 px: ragged valid regions), teacher maps at
    strides 4 and 8, and student maps (the teacher pooled to the student's stride, plus noise)."""
    generator = np.random.default_rng(11)
    batches, student_maps = [], []
    for _ in range(2):
        batch = []
        for image_hw in ((64, 64), (64, 48), (64, 64)):
            teacher = {4: _maps(generator, (16, 16)), 8: _maps(generator, (8, 8))}
            batch.append({"image": torch.zeros(3, *image_hw), "image_hw": image_hw,
                          "teacher_features": {s: torch.from_numpy(m) for s, m in teacher.items()}})
        student = {}
        for s, t in PAIRS:
            stacked = torch.stack([item["teacher_features"][t] for item in batch])
            pooled = torch.nn.functional.avg_pool2d(stacked, s // t)
            student[s] = pooled + 0.5 * torch.from_numpy(generator.standard_normal(pooled.shape).astype(np.float32))
        batches.append(batch)
        student_maps.append(student)
    distill = Distillation(PAIRS, alpha=6.0)
    exact = [pkd_gradients(m, b, distill, SIZE_DIVISOR) for m, b in zip(student_maps, batches)]
    return batches, student_maps, distill, exact


def _measure(coder, study_batches) -> dict:
    batches, student_maps, distill, exact = study_batches
    return measure(coder, batches, student_maps, distill, SIZE_DIVISOR, exact)


def test_exact_codec_measures_r_one_and_cosine_one(study_batches):
    result = _measure(store_codec("fp32"), study_batches)
    for stride in (4, 8):
        assert result["r_lowest"][stride] == pytest.approx(1.0, abs=1e-12)
        assert result["grad_cosine_lowest"][stride] == pytest.approx(1.0, abs=1e-12)
    assert result["grad_cosine_all_lowest"] == pytest.approx(1.0, abs=1e-12)
    assert 0.9 < result["bytes_over_fp32"] <= 1.01  # random float32 barely compresses


def test_zeroing_one_channel_shows_in_r_and_in_that_level_gradient_only(study_batches):
    def zero_channel(values: np.ndarray, stride: int) -> tuple[np.ndarray, int]:
        decoded = values.copy()
        if stride == 4:
            decoded[2] = 0
        return decoded, values.nbytes

    result = _measure(zero_channel, study_batches)
    assert result["r_lowest"][4] == 0.0  # a constant decoded channel has no correlation, not an undefined one
    assert result["r_median"][4] == pytest.approx(1.0, abs=1e-12)
    assert result["grad_cosine_lowest"][4] < 0.99
    assert result["grad_cosine_lowest"][8] == pytest.approx(1.0, abs=1e-12)
    assert result["grad_cosine_all_lowest"] < 1 - 1e-4


def test_gradient_is_invariant_to_per_channel_affine_teacher_maps_only(study_batches):
    """PKD standardises each channel: a positive scale and an offset per channel change nothing, a sign does."""
    scale = np.linspace(0.5, 3, CHANNELS, dtype=np.float32)[:, None, None]

    def affine(values, stride):
        return values * scale + 7.0, values.nbytes

    def flip(values, stride):
        return values * np.where(np.arange(CHANNELS) == 0, -1, 1).astype(np.float32)[:, None, None], values.nbytes

    assert min(_measure(affine, study_batches)["grad_cosine_lowest"].values()) > 1 - 1e-6
    assert max(_measure(flip, study_batches)["grad_cosine_lowest"].values()) < 0.99


def test_channel_pearson_skips_constant_stored_channels_and_uses_the_valid_region():
    generator = np.random.default_rng(5)
    stored = generator.standard_normal((3, 4, 4)).astype(np.float32)
    stored[1] = 2.0
    decoded = stored.copy()
    decoded[0, 3, :] = 100.0  # outside the valid 3x4 region: ignored
    r = channel_pearson(stored, decoded, (3, 4))
    assert r[0] == pytest.approx(1.0) and np.isnan(r[1]) and r[2] == pytest.approx(1.0)
    assert channel_pearson(stored, -decoded, (3, 4))[0] == pytest.approx(-1.0)


def test_uniform_bits_stays_within_half_a_step_and_spends_fewer_bytes_with_fewer_bits():
    values = _maps(np.random.default_rng(2), (24, 24))
    sizes = {}
    for bits in (8, 6, 4, 2):
        decoded, sizes[bits] = uniform_bits(bits)(values, 4)
        span = values.max(axis=(1, 2)) - values.min(axis=(1, 2))
        error = np.abs(decoded - values).max(axis=(1, 2))
        assert (error <= span / (2**bits - 1) / 2 * (1 + 1e-5) + 1e-6).all()
        assert np.allclose(decoded.min(axis=(1, 2)), values.min(axis=(1, 2)), atol=1e-5)
    assert sizes[8] > sizes[6] > sizes[4] > sizes[2]


def test_pca_reconstructs_at_a_fine_step_and_spends_little_on_what_the_basis_leaves_out():
    generator = np.random.default_rng(3)
    fit = [_maps(generator, (16, 16)) for _ in range(6)]
    values = _maps(generator, (16, 16))
    bases = {4: fit_level_basis(fit, 0.1)}
    assert np.allclose(bases[4].components.T @ bases[4].components, np.eye(CHANNELS), atol=1e-5)
    std = values.std(axis=(1, 2))[:, None, None]
    fine, fine_bytes = pca_codec(bases, {4: 1e-4})(values, 4)
    coarse, coarse_bytes = pca_codec(bases, {4: 0.5})(values, 4)
    assert np.abs(fine - values).max() < 1e-3 * std.min()
    assert np.abs(coarse - values).max() > 1e-2 * std.min()
    assert coarse_bytes < fine_bytes
    # Three fields make three strong components; the noise components round to zero at a coarse step.
    flat = np.concatenate([m.reshape(CHANNELS, -1) for m in fit], axis=1).astype(np.float64)
    standard = (flat - bases[4].mean[:, None]) / bases[4].scale[:, None]
    variances = (bases[4].components.T.astype(np.float64) @ standard).var(axis=1)
    assert variances[:3].sum() > 0.95 * CHANNELS
    assert coarse_bytes < uniform_bits(4)(values, 4)[1]


def test_pca_points_give_coarse_levels_finer_steps():
    assert level_steps(0.1, [4, 8, 16], 0.5) == pytest.approx({4: 0.1, 8: 0.1 / 2**0.5, 16: 0.05})
    assert level_steps(0.1, [4, 16], 0.0) == {4: 0.1, 16: 0.1}
    assert parse_pca_points("0.1, 0.05@0", 0.5) == [("pca 0.1", 0.1, 0.5), ("pca 0.05 (level power 0)", 0.05, 0.0)]


def test_code_bytes_pick_the_smaller_layout_and_zigzag_orders_by_magnitude():
    assert zigzag(np.array([0, -1, 1, -2, 2])).tolist() == [0, 1, 2, 3, 4]
    zeros = np.zeros(4096, np.int64)
    assert unsigned_code_bytes(zeros) < 64
    for bits in (12, 20):  # random codes do not compress: about bits / 8 bytes each, none lost past 16 bits
        wide = np.random.default_rng(bits).integers(0, 2**bits, 4096)
        assert 4096 * bits / 8 * 0.95 < unsigned_code_bytes(wide) < 4096 * bits / 8 * 1.1


def test_cosine_is_scale_free_and_signed():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 2.0]])
    assert cosine(a, b) == pytest.approx(2**-0.5)
    assert cosine(a, 3 * a) == pytest.approx(1.0) and cosine(b, -b) == pytest.approx(-1.0)


def test_default_point_is_the_fewest_bytes_that_keep_every_gradient_cosine():
    results = {"a": {"bytes_over_fp32": 0.5, "grad_cosine_lowest": {4: 0.9999, 8: 0.9995}},
               "b": {"bytes_over_fp32": 0.2, "grad_cosine_lowest": {4: 0.9999, 8: 0.998}},
               "c": {"bytes_over_fp32": 0.3, "grad_cosine_lowest": {4: 0.9991, 8: 0.9992}}}
    assert default_point(results) == "c"
    assert default_point({"b": results["b"]}) is None


@pytest.mark.slow
def test_the_study_runs_on_a_store_and_its_student_and_refuses_a_projected_store(synth_data, tmp_path):
    """End to end on a tiny store (random-init teacher) and a student trained one step against it."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from stages.extract import ExtractConfig, extract
    from stages.train import TrainConfig, train

    settings = dict(teacher="swin", random_init=True, variant="tiny", data=synth_data, split="train", views=2,
                    short_side=128, max_size=128, batch_size=4, workers=0, samples_per_shard=4, progress=False,
                    levels="2,3,4,5")
    store = extract(ExtractConfig(out=tmp_path / "full.zarr", codec="fp16", **settings))
    student = train(TrainConfig(student="retinanet", backbone="resnet18", variant="tiny", data=synth_data,
                                out=tmp_path / "run", features=store, level_map="index", iters=1, batch_size=4,
                                workers=0, short_side=128, max_size=128, val_split=None, warmup_iters=1,
                                optimizer="adamw", lr=1e-3, progress=False))
    command = [sys.executable, "-m", "benchmarks.bits_study", str(store), "--student", str(student), "--data", str(synth_data),
               "--batches", "1", "--batch-size", "4", "--fit-samples", "4", "--pca-steps", "0.1",
               "--json", str(tmp_path / "bits.json"), "--plot", str(tmp_path / "bits.png")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line == json.loads((tmp_path / "bits.json").read_text()) and (tmp_path / "bits.png").stat().st_size > 0
    assert line["pairs"] == [[8, 4], [16, 8], [32, 16], [64, 32]] and line["samples"] == 4
    assert set(line["points"]) == {"fp16", "int8", "int6", "int4", "int2", "uniform 6-bit", "uniform 4-bit",
                                   "uniform 2-bit", "pca 0.1", "pca (store codec)"}
    exact = line["points"]["fp16"]  # an fp16 store through fp16: the stored values themselves
    assert min(exact["grad_cosine_lowest"].values()) == pytest.approx(1.0, abs=1e-9)
    assert min(exact["r_lowest"].values()) == pytest.approx(1.0, abs=1e-9)
    assert line["points"]["uniform 2-bit"]["bytes_over_fp32"] < line["points"]["int8"]["bytes_over_fp32"] < 0.5
    points = line["points"]
    assert points["int2"]["bytes_over_fp32"] < points["int4"]["bytes_over_fp32"] < points["int6"]["bytes_over_fp32"]
    assert points["pca (store codec)"]["grad_cosine_all_lowest"] > points["int2"]["grad_cosine_all_lowest"]

    projected = extract(ExtractConfig(out=tmp_path / "projected.zarr", layout="projected", student_levels="3,4,5,6",
                                      **settings))
    refused = subprocess.run([*command[:3], str(projected), *command[4:]], capture_output=True, text=True, timeout=600,
                             cwd=Path(__file__).resolve().parents[1])
    assert refused.returncode == 2 and "projected layout" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
