"""Codecs: round trips within the stated error bounds, constant channels, refusal of non-finite input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from storage import CODECS, StoreError
from storage.codecs import needs_basis
from storage.pca_basis import fit_level_basis
from storage.testing import smooth_features


def usable(name: str, features: np.ndarray):
    """CODECS[name], bound to a basis fitted on ``features`` where the codec needs one (pca)."""
    codec = CODECS[name]
    return codec.bound(fit_level_basis([features], 0.1)) if needs_basis(name) else codec


@pytest.fixture
def features() -> np.ndarray:
    return smooth_features(np.random.default_rng(0), channels=8, height=24, width=31)


def pearson_r(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("name", sorted(CODECS))
def test_round_trip_within_error_bound_and_layout(name, features):
    codec = usable(name, features)
    parts = codec.encode(features)
    layout = codec.part_layout(features.shape[0])
    assert set(parts) == set(layout)
    for part, (dtype, kind) in layout.items():
        assert parts[part].dtype == dtype
        assert parts[part].shape == (features.shape if kind == "map" else features.shape[:1])
    decoded = codec.decode(parts)
    assert decoded.dtype == np.float32 and decoded.shape == features.shape
    assert np.abs(decoded - features).max() <= codec.error_bound(features)


def test_fp32_is_exact(features):
    assert np.array_equal(CODECS["fp32"].decode(CODECS["fp32"].encode(features)), features)


def test_fp16_relative_error_is_half_precision(features):
    decoded = CODECS["fp16"].decode(CODECS["fp16"].encode(features))
    assert np.abs(decoded - features).max() <= 1e-3 * np.abs(features).max()
    assert CODECS["fp16"].error_bound(features) <= 1e-3 * np.abs(features).max()


def test_int8_error_is_half_a_step_per_channel_and_correlation_high(features):
    codec = CODECS["int8"]
    parts = codec.encode(features)
    decoded = codec.decode(parts)
    per_channel_error = np.abs(decoded - features).reshape(features.shape[0], -1).max(axis=1)
    assert np.all(per_channel_error <= parts["scale"] / 2 * (1 + 1e-5) + 1e-6 * np.abs(features).max())
    np.testing.assert_allclose(parts["scale"], np.ptp(features.reshape(8, -1), axis=1) / 254, rtol=1e-6)
    assert pearson_r(decoded, features) > 0.999
    assert parts["q"].min() >= -127 and parts["q"].max() <= 127


@pytest.mark.parametrize("bits", [8, 6, 4, 2])
def test_int_widths_use_their_levels_and_fewer_bits_compress_smaller(bits, features):
    """intK holds 2 ** (K - 1) - 1 steps each side of the channel's mid-range (int2: -1, 0, 1); every width is
    stored in int8, so the saving shows after zstd, as the stores compress."""
    from numcodecs import Zstd

    codec = CODECS[f"int{bits}"]
    levels = 2 ** (bits - 1) - 1
    parts = codec.encode(features)
    assert parts["q"].dtype == np.int8 and parts["q"].min() == -levels and parts["q"].max() == levels
    np.testing.assert_allclose(parts["scale"], np.ptp(features.reshape(8, -1), axis=1) / (2 * levels), rtol=1e-6)
    compressed = {k: len(Zstd(level=3).encode(np.ascontiguousarray(CODECS[f"int{k}"].encode(features)["q"])))
                  for k in (8, 6, 4, 2)}
    assert compressed[8] > compressed[6] > compressed[4] > compressed[2]
    r = pearson_r(codec.decode(parts), features)
    assert r > {8: 0.9999, 6: 0.999, 4: 0.95, 2: 0.5}[bits]


def test_int8_constant_channel_is_exact_without_division_by_zero(features):
    features[3] = 2.5
    features[5] = 0.0
    with np.errstate(all="raise"):
        parts = CODECS["int8"].encode(features)
        decoded = CODECS["int8"].decode(parts)
    assert parts["scale"][3] == 0 and parts["scale"][5] == 0
    assert np.all(decoded[3] == 2.5) and np.all(decoded[5] == 0.0)


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_refused(name, bad, features):
    codec = usable(name, features)
    features[2, 3, 4] = bad
    with pytest.raises(StoreError, match="NaN/Inf"):
        codec.encode(features)


def test_fp16_overflow_is_refused(features):
    features[0, 0, 0] = 1e6
    with pytest.raises(StoreError, match="fp32"):
        CODECS["fp16"].encode(features)


def test_non_3d_input_is_refused():
    with pytest.raises(StoreError, match=r"\(C, H, W\)"):
        CODECS["int8"].encode(np.zeros((4, 4), np.float32))


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    name=st.sampled_from(["fp16", "int8"]),
    values=arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5)),
                  elements=st.floats(-1e4, 1e4, width=32)),
)
def test_any_finite_input_decodes_within_bound(name, values):
    codec = CODECS[name]
    decoded = codec.decode(codec.encode(values))
    assert np.abs(decoded.astype(np.float64) - values).max() <= codec.error_bound(values)
