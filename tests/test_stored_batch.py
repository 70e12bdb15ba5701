"""A batch's stored levels decoded at once (pkd_offline/stored_batch.py): the same values as decoding each sample
on its own, for every codec, on maps of different sizes."""

import numpy as np
import pytest
import torch

from pkd_offline.device_codecs import DEVICE_CODECS, EncodedMap
from pkd_offline.stored_batch import fit_trailing, pad_stack, stored_cells, stored_levels
from storage import CODECS
from storage.pca_basis import fit_level_basis
from storage.testing import smooth_features

SIZES = [(9, 13), (6, 13), (9, 7)]  # (h, w) of three samples' maps: ragged in both axes


def ragged_maps() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [smooth_features(rng, channels=5, height=h, width=w) for h, w in SIZES]


def encoded(name: str, maps: list[np.ndarray]) -> list[EncodedMap]:
    """``maps`` encoded with codec ``name`` (pca: with a basis fitted on them)."""
    basis = fit_level_basis(maps, step=0.01) if name == "pca" else None
    codec = CODECS[name].bound(basis) if basis is not None else CODECS[name]
    return [EncodedMap(name, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in codec.encode(m).items()},
                       basis) for m in maps]


@pytest.mark.parametrize("name", sorted(DEVICE_CODECS))
def test_one_decode_per_level_equals_decoding_each_sample(name):
    stored = encoded(name, ragged_maps())
    batch = stored_levels({4: stored}, "cpu")[4]
    assert batch.shape == (3, 5, 9, 13) and batch.dtype == torch.float32
    for i, sample in enumerate(stored):
        h, w = SIZES[i]
        torch.testing.assert_close(batch[i, :, :h, :w], sample.decode("cpu"), rtol=0, atol=0)
        assert torch.isfinite(batch[i]).all(), "cells past a sample's map decode to finite values"


def test_dense_maps_are_zero_padded_and_fitted_to_a_frame():
    maps = [torch.from_numpy(m) for m in ragged_maps()]
    batch = stored_levels({8: maps}, None)[8]
    assert batch.shape == (3, 5, 9, 13)
    assert torch.equal(batch[1, :, :6], maps[1]) and not batch[1, :, 6:].any()
    assert torch.equal(batch[2, :, :, :7], maps[2]) and not batch[2, :, :, 7:].any()
    assert torch.equal(pad_stack(maps, (5, 8, 15)), fit_trailing(batch, (8, 15)))
    assert fit_trailing(batch, (8, 15)).shape == (3, 5, 8, 15) and not fit_trailing(batch, (8, 15))[..., 13:].any()


@pytest.mark.parametrize("name", sorted(DEVICE_CODECS))
def test_cells_of_several_levels_decode_as_each_sample_flattened(name):
    """Two levels (another basis each for pca) of ragged maps, decoded together, end to end (pca: a matrix
    product over more cells at once, so equal up to float32 rounding)."""
    rng = np.random.default_rng(2)
    smaller = [smooth_features(rng, channels=5, height=h, width=w) for h, w in [(4, 3), (2, 5), (3, 3)]]
    stored = encoded(name, ragged_maps()) + encoded(name, smaller)
    expected = torch.cat([sample.decode("cpu").flatten() for sample in stored])
    tolerance = 1e-6 if name == "pca" else 0.0
    torch.testing.assert_close(stored_cells(stored, "cpu"), expected, rtol=tolerance, atol=tolerance)
    dense = [torch.from_numpy(m) for m in ragged_maps() + smaller]
    assert torch.equal(stored_cells(dense, None), torch.cat([m.flatten() for m in dense]))
