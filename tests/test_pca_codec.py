"""The pca codec (storage.codecs.PcaCodec, storage.pca_basis): a per-level channel basis fitted once at the start
of extraction and kept in the store, decorrelation before quantisation, its torch twin, and its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numcodecs import Zstd

from device_encoding import encode_checked, encode_on_device
from pkd_offline.errors import PkdError
from pkd_offline.device_codecs import DEVICE_CODECS, EncodedMap
from stages.extract import ExtractConfig, extract
from storage import CODECS, StoreError, describe, open_store
from storage.codecs import EncodedLevel
from storage.manifest import Manifest
from storage.pca_basis import SIDE_NAME, fit_level_basis, level_steps, read_side, side_bytes
from storage.testing import killed_copy, smooth_features


def correlated_maps(count: int, seed: int, channels: int = 32, latent: int = 4) -> list[np.ndarray]:
    """Maps (C, 20, 26) whose channels mix ``latent`` smooth fields (one mixing for every seed) plus a little
    noise: FPN-like redundancy."""
    mixing = np.random.default_rng(100).normal(size=(channels, latent))  # the teacher's: the same for every map
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(count):
        fields = smooth_features(rng, latent, 20, 26).reshape(latent, -1)
        maps.append((mixing @ fields + 0.02 * rng.normal(size=(channels, fields.shape[1])) + 3.0)
                    .reshape(channels, 20, 26).astype(np.float32))
    return maps


def zstd_bytes(parts: dict[str, np.ndarray]) -> int:
    return sum(len(Zstd(level=3).encode(np.ascontiguousarray(part))) for part in parts.values())


def test_basis_is_orthonormal_ordered_by_variance_and_deterministic():
    maps = correlated_maps(6, seed=0)
    basis = fit_level_basis(maps, step=0.1)
    components = basis.components.astype(np.float64)
    np.testing.assert_allclose(components.T @ components, np.eye(32), atol=1e-5)
    flat = np.concatenate([m.reshape(32, -1) for m in maps], axis=1)
    standard = (flat - basis.mean[:, None]) / basis.scale[:, None]
    variances = (components.T @ standard).var(axis=1)
    assert np.all(np.diff(variances) <= 1e-6) and variances[:4].sum() > 0.95 * 32  # four latent fields
    again = fit_level_basis([m.copy() for m in maps], step=0.1)
    assert side_bytes({4: basis}) == side_bytes({4: again})  # same maps, same file, byte for byte
    assert np.all(components[np.abs(components).argmax(axis=0), np.arange(32)] > 0)  # sign fixed


def test_round_trip_is_within_the_stated_bound_and_smaller_than_int8_on_correlated_channels():
    fit, held_out = correlated_maps(6, seed=0), correlated_maps(3, seed=1)
    basis = fit_level_basis(fit, step=0.1)
    codec = CODECS["pca"].bound(basis)
    for features in held_out:
        parts = codec.encode(features)
        assert set(parts) == {"low", "high"} and all(p.dtype == np.uint8 and p.shape == features.shape
                                                     for p in parts.values())
        decoded = codec.decode(parts)
        assert np.abs(decoded - features).max() <= codec.error_bound(features)
        # Each component (standardised, rotated) is within half a step: the quantiser's own guarantee.
        error = (decoded - features).reshape(32, -1).astype(np.float64) / basis.scale[:, None]
        assert np.abs(basis.components.T.astype(np.float64) @ error).max() <= 0.1 / 2 + 1e-4
        assert np.corrcoef(decoded.ravel(), features.ravel())[0, 1] > 0.999
        assert zstd_bytes(parts) < 0.6 * zstd_bytes(CODECS["int8"].encode(features))


def test_coarser_levels_get_finer_steps_and_an_unbound_codec_refuses_to_encode():
    assert level_steps(0.1, [4, 8, 16]) == pytest.approx({4: 0.1, 8: 0.1 / 2 ** 0.5, 16: 0.05})
    with pytest.raises(StoreError, match="basis"):
        CODECS["pca"].encode(correlated_maps(1, seed=0)[0])
    far = correlated_maps(1, seed=0)[0]
    codec = CODECS["pca"].bound(fit_level_basis(correlated_maps(4, seed=0), step=1e-4))
    far[0] += 1e4
    with pytest.raises(StoreError, match="int8"):
        codec.encode(far)


def test_side_file_refuses_bad_bytes_missing_levels_wrong_shapes_and_non_finite_values():
    basis = fit_level_basis(correlated_maps(3, seed=0), step=0.1)
    good = side_bytes({4: basis, 8: basis})
    assert set(read_side(good, {4: 32, 8: 32}, "x")) == {4, 8}
    with pytest.raises(StoreError, match="not a readable"):
        read_side(good[:100], {4: 32, 8: 32}, "x")
    with pytest.raises(StoreError, match="expected the arrays"):
        read_side(side_bytes({4: basis}), {4: 32, 8: 32}, "x")
    with pytest.raises(StoreError, match="expected float32"):
        read_side(good, {4: 16, 8: 32}, "x")
    bad = fit_level_basis(correlated_maps(3, seed=0), step=0.1)
    bad.components[2, 3] = np.nan
    with pytest.raises(StoreError, match="non-finite"):
        read_side(side_bytes({4: bad, 8: basis}), {4: 32, 8: 32}, "x")
    bad = fit_level_basis(correlated_maps(3, seed=0), step=0.0)
    with pytest.raises(StoreError, match="step <= 0"):
        read_side(side_bytes({4: bad, 8: basis}), {4: 32, 8: 32}, "x")


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_damaged_side_bytes_give_a_store_error_and_nothing_else(data):
    """Whatever the bytes (the sha256 check comes first on read; this is the parser beneath it), one StoreError."""
    basis = fit_level_basis(correlated_maps(2, seed=0, channels=8), step=0.1)
    good = bytearray(side_bytes({4: basis}))
    action = data.draw(st.sampled_from(["flip", "truncate", "random"]))
    if action == "flip":
        for position in data.draw(st.lists(st.integers(0, len(good) - 1), min_size=1, max_size=8)):
            good[position] ^= data.draw(st.integers(1, 255))
        damaged = bytes(good)
    elif action == "truncate":
        damaged = bytes(good[:data.draw(st.integers(0, len(good) - 1))])
    else:
        damaged = data.draw(st.binary(max_size=2000))
    try:
        read_side(damaged, {4: 8}, "x")
    except StoreError:
        pass


def test_torch_twin_matches_the_storage_codec():
    fit, held_out = correlated_maps(6, seed=0), correlated_maps(3, seed=1)
    basis = fit_level_basis(fit, step=0.1)
    codec = CODECS["pca"].bound(basis)
    levels = encode_on_device("pca", torch.from_numpy(np.stack(held_out)), basis)
    for features, level in zip(held_out, levels):
        expected = codec.encode(features)
        codes = [part.astype(np.int64) for part in (level.parts["low"], level.parts["high"])]
        wanted = [part.astype(np.int64) for part in (expected["low"], expected["high"])]
        differ = np.count_nonzero(codes[0] + 256 * codes[1] != wanted[0] + 256 * wanted[1])
        assert differ <= 1e-4 * features.size  # float64 either way: only a tie's rounding can differ
        decoded = EncodedMap.from_level(EncodedLevel("pca", expected, basis)).decode("cpu")
        np.testing.assert_allclose(decoded.numpy(), codec.decode(expected), rtol=0,
                                   atol=1e-5 * np.abs(features).max())
    with pytest.raises(ValueError, match="basis"):
        encode_checked("pca", torch.from_numpy(held_out[0]), None)
    with pytest.raises(ValueError, match="basis"):
        DEVICE_CODECS["pca"].decode(expected, None)


def config(data, out, **overrides) -> ExtractConfig:
    settings = dict(teacher="swin", random_init=True, variant="tiny", data=data, split="train", out=out,
                    views=2, short_side=128, max_size=128, batch_size=4, workers=0, samples_per_shard=4,
                    progress=False, codec="pca", levels="2,3,4,5")
    return ExtractConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def pca_store(synth_data, tmp_path_factory):
    return extract(config(synth_data, tmp_path_factory.mktemp("pca") / "f.zarr"))


def test_extracted_store_holds_the_basis_and_decodes_within_the_bound_of_the_fp32_maps(synth_data, pca_store,
                                                                                       tmp_path):
    exact = open_store(str(extract(config(synth_data, tmp_path / "fp32.zarr", codec="fp32"))))
    store = open_store(str(pca_store))
    side = store.manifest.codec_side
    assert side["file"] == SIDE_NAME and side["step"] == 0.1 and (pca_store / SIDE_NAME).exists()
    bases = store.level_codecs.bases
    assert sorted(bases) == [4, 8, 16, 32] and bases[4].step == pytest.approx(0.1)
    assert bases[32].step == pytest.approx(0.1 / 8 ** 0.5)
    for index in (0, 5, 11):
        stored, reference = store.read(index), exact.read(index)
        for stride, features in stored.features.items():
            expected = reference.features[stride]
            assert np.abs(features - expected).max() <= store.level_codecs[stride].error_bound(expected) + 1e-5
            assert np.corrcoef(features.ravel(), expected.ravel())[0, 1] > 0.999
    sizes = describe(store, digest=True)["levels"]
    int8 = describe(open_store(str(extract(config(synth_data, tmp_path / "i8.zarr", codec="int8")))))["levels"]
    assert sum(level["bytes_on_disk"] for level in sizes.values()) \
        < 0.8 * sum(level["bytes_on_disk"] for level in int8.values())
    store.keep_encoded = True
    encoded = store.read(5).features[4]
    assert isinstance(encoded, EncodedLevel) and encoded.basis is bases[4]


def test_the_basis_is_fitted_on_extractions_own_first_batches_and_no_image_meets_the_teacher_twice(
        synth_data, pca_store, tmp_path, monkeypatch):
    import stages.extract as extract_module

    seen = []
    real = extract_module.teacher_levels

    def counting(teacher, batch, *args, **kwargs):
        seen.extend((item["image_index"], item["view_index"]) for item in batch)
        return real(teacher, batch, *args, **kwargs)
    monkeypatch.setattr(extract_module, "teacher_levels", counting)
    out = extract(config(synth_data, tmp_path / "again.zarr"))
    store = open_store(str(out))
    assert sorted(seen) == sorted(set(seen)) and len(seen) == store.manifest.n_samples  # one forward per sample
    assert describe(store, digest=True)["digest"] == describe(open_store(str(pca_store)), digest=True)["digest"]
    # The basis is the moments' fit of the first FIT_SAMPLES samples' stored maps, in shard order.
    exact = open_store(str(extract(config(synth_data, tmp_path / "fp32.zarr", codec="fp32"))))
    first = range(min(extract_module.FIT_SAMPLES, exact.manifest.n_samples))
    for stride, basis in store.level_codecs.bases.items():
        refit = fit_level_basis([exact.read(i).features[stride] for i in first], basis.step)
        np.testing.assert_allclose(basis.components, refit.components, atol=1e-4)
        np.testing.assert_allclose(basis.mean, refit.mean, rtol=1e-5, atol=1e-6)


def test_a_resumed_extraction_keeps_its_basis_and_never_refits(synth_data, pca_store, tmp_path, monkeypatch):
    expected = describe(open_store(str(pca_store)))["digest"]
    killed = killed_copy(pca_store, tmp_path / "killed.zarr", unfinished_shards=(1, 3))
    import stages.extract as extract_module

    def refit(*args, **kwargs):
        raise AssertionError("a resumed pca store must keep its basis")
    monkeypatch.setattr(extract_module, "fit_side", refit)
    extract(config(synth_data, killed))
    assert describe(open_store(str(killed)))["digest"] == expected
    with pytest.raises(AssertionError, match="keep its basis"):  # --overwrite starts afresh: it fits
        extract(config(synth_data, killed, overwrite=True))


def test_another_step_is_another_job(synth_data, pca_store, tmp_path):
    killed = killed_copy(pca_store, tmp_path / "killed.zarr", unfinished_shards=(1,))
    with pytest.raises(StoreError, match="codec_side.step"):
        extract(config(synth_data, killed, pca_step=0.2))
    with pytest.raises(PkdError, match="pca-step"):
        extract(config(synth_data, tmp_path / "bad.zarr", pca_step=0.0))


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_a_damaged_or_missing_basis_is_refused_on_open_and_named_by_verify(pca_store, tmp_path, damage):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(pca_store, copy)
    side = copy / SIDE_NAME
    if damage == "flip":
        data = bytearray(side.read_bytes())
        data[len(data) // 2] ^= 0xFF
        side.write_bytes(bytes(data))
    else:
        side.unlink()
    with pytest.raises(StoreError, match="re-extract the store") as error:
        open_store(str(copy))
    assert "\n" not in str(error.value)
    assert ("sha256" if damage == "flip" else "missing") in str(error.value)


def test_manifest_requires_a_side_record_for_pca_and_none_for_other_codecs(pca_store):
    raw = json.loads((pca_store / "manifest.json").read_text())
    assert Manifest.from_json(json.dumps(raw)).codec_side == raw["codec_side"]
    for broken in ({**raw, "codec_side": None}, {**raw, "codec_side": {**raw["codec_side"], "sha256": "zz"}},
                   {**raw, "codec": "int8"}):
        with pytest.raises(StoreError, match="codec_side"):
            Manifest.from_json(json.dumps(broken))


def test_a_stores_basis_is_copied_to_the_device_once_and_decodes_as_numpy_does(monkeypatch):
    """Bases read from a side file carry a key (the file's sha256 and the stride); the decoder keeps their device
    copies, so a sample's decode does not copy the basis again. An unkeyed basis (a fresh fit) is never kept."""
    import pkd_offline.device_codecs as device_codecs

    maps = correlated_maps(6, seed=3)
    side = side_bytes({4: fit_level_basis(maps[:4], 0.1), 8: fit_level_basis(maps[2:], 0.1)})
    bases = read_side(side, {4: 32, 8: 32}, "test")
    assert bases[4].key != bases[8].key and bases[4].key.startswith(__import__("hashlib").sha256(side).hexdigest())
    monkeypatch.setattr(device_codecs, "_KEPT", {})
    copies = []
    real = torch.from_numpy
    monkeypatch.setattr(device_codecs.torch, "from_numpy", lambda values: copies.append(1) or real(values))
    codec = CODECS["pca"].bound(bases[8])
    parts = codec.encode(maps[5])
    decoded = [EncodedMap("pca", {n: real(v) for n, v in parts.items()}, bases[8]).decode("cpu") for _ in range(3)]
    assert len(copies) == 3  # mean, scale, components: once for three decodes
    np.testing.assert_allclose(decoded[2].numpy(), codec.decode(parts), rtol=0, atol=1e-4)
    unkeyed = fit_level_basis(maps[:4], 0.1)
    unkeyed_parts = CODECS["pca"].bound(unkeyed).encode(maps[5])
    for _ in range(2):
        EncodedMap("pca", {n: real(v) for n, v in unkeyed_parts.items()}, unkeyed).decode("cpu")
    assert len(copies) == 3 + 6
