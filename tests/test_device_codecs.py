"""Maps encoded where the teacher runs and decoded where the student trains (pkd_offline/device_codecs.py):
the torch codecs are the storage codecs bit for bit, readers keep levels encoded on request, and the
training loss is the same whether the workers or the device decode."""

import numpy as np
import pytest
import torch

from device_encoding import encode_checked, encode_on_device
from pkd_offline.data import CocoDetection, collate
from pkd_offline.engine import Distillation, distillation_loss
from pkd_offline.pyramid import pad_teacher_maps
from pkd_offline.device_codecs import EncodedMap, dense_map
from stages.extract import ExtractConfig, extract
from pkd_offline.store_data import SHUFFLE_BUFFER_BYTES, StoreJoinedDataset, StoreStream, store_views
from storage import CODECS, StoreError, open_store
from storage.codecs import EncodedLevel
from storage.testing import smooth_features

INDEX_PAIRS = [(8, 4), (16, 8), (32, 16), (64, 32)]


def maps_batch() -> np.ndarray:
    """Three seeded (8, 24, 31) maps, one with a constant channel and one with a zero channel."""
    rng = np.random.default_rng(0)
    batch = np.stack([smooth_features(rng, channels=8, height=24, width=31) for _ in range(3)])
    batch[1, 3] = 2.5
    batch[2, 5] = 0.0
    return batch


@pytest.mark.parametrize("name", sorted(name for name in CODECS if name != "pca"))  # pca: tests/test_pca_codec.py
def test_torch_encoder_and_decoder_equal_the_storage_codec_bit_for_bit(name):
    batch = maps_batch()
    levels = encode_on_device(name, torch.from_numpy(batch))
    for features, level in zip(batch, levels):
        expected = CODECS[name].encode(features)
        assert level.codec == name and set(level.parts) == set(expected)
        for part, values in expected.items():
            assert level.parts[part].dtype == values.dtype
            np.testing.assert_array_equal(level.parts[part], values)
        decoded = EncodedMap.from_level(level).decode("cpu")
        assert decoded.dtype == torch.float32
        np.testing.assert_array_equal(decoded.numpy(), CODECS[name].decode(expected))
        assert tuple(level.shape) == features.shape == tuple(EncodedMap.from_level(level).shape)


def test_int8_twin_rounds_half_to_even_and_handles_empty_maps():
    features = torch.tensor([[[0.0, 0.5, 1.5, 2.5, 254.0]]])  # scale 1, offset 127: steps -127 .. 127 with .5s
    parts = encode_checked("int8", features)
    assert parts["q"].tolist() == [[[-127, -126, -126, -124, 127]]]  # -126.5, -125.5, -124.5 go to even
    np.testing.assert_array_equal(parts["q"].numpy(), CODECS["int8"].encode(features.numpy())["q"])
    empty = encode_on_device("int8", torch.zeros(2, 4, 0, 5))
    assert empty[0].parts["q"].shape == (4, 0, 5) and empty[0].parts["scale"].tolist() == [0.0] * 4


def test_fp16_twin_refuses_values_past_its_range():
    with pytest.raises(ValueError, match="fp16 range"):
        encode_checked("fp16", torch.full((1, 2, 2), 7e4))


def test_dense_map_passes_tensors_through_and_decodes_encoded_maps():
    tensor = torch.ones(2, 3, 3)
    assert dense_map(tensor) is tensor
    level = encode_on_device("int8", torch.from_numpy(maps_batch()))[0]
    assert torch.equal(dense_map(EncodedMap.from_level(level), "cpu"), EncodedMap.from_level(level).decode("cpu"))


@pytest.fixture(scope="module")
def stores(synth_data, tmp_path_factory):
    """Full-layout stores of each format and codec, and projected ones, of the tiny Swin on the synthetic set."""
    root = tmp_path_factory.mktemp("encoded")
    settings = dict(teacher="swin", random_init=True, variant="tiny", data=synth_data, split="train", views=1,
                    short_side=128, max_size=128, batch_size=4, workers=0, samples_per_shard=4, progress=False,
                    levels="2,3,4,5")
    made = {}
    for name, fmt, codec, layout in [("zarr-fp16", "f.zarr", "fp16", {}), ("wds-int8", "wds", "int8", {}),
                                     ("zarr-int8-projected", "p.zarr", "int8",
                                      {"layout": "projected", "student_levels": "3,4,5,6"}),
                                     ("wds-fp16-projected", "pw", "fp16",
                                      {"layout": "projected", "student_levels": "3,4,5,6"}),
                                     ("wds-pca", "w", "pca", {}),
                                     ("zarr-pca-projected", "q.zarr", "pca",
                                      {"layout": "projected", "student_levels": "3,4,5,6"})]:
        made[name] = extract(ExtractConfig(out=root / f"{name}-{fmt}", codec=codec, **settings, **layout))
    return made


ALL_STORES = ["zarr-fp16", "wds-int8", "zarr-int8-projected", "wds-fp16-projected", "wds-pca", "zarr-pca-projected"]


def assert_decoded_equal(actual: np.ndarray, expected: np.ndarray, codec: str) -> None:
    """Bit for bit; pca's device decode works in float32 where numpy's works in float64."""
    if codec == "pca":
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * max(1.0, float(np.abs(expected).max())))
    else:
        np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("name", ALL_STORES)
def test_kept_encoded_samples_decode_to_what_the_reader_decodes(stores, name):
    store = open_store(str(stores[name]))
    decoded = store.read(5)
    store.keep_encoded = True
    encoded = store.read(5)
    assert encoded.statistics.keys() == decoded.statistics.keys()
    for stride, level in encoded.features.items():
        assert isinstance(level, EncodedLevel) and level.codec == store.manifest.codec
        assert level.parts[next(iter(CODECS[level.codec].part_layout(0)))].dtype != np.float32 or level.codec == "fp32"
        assert_decoded_equal(EncodedMap.from_level(level).decode("cpu").numpy(), decoded.features[stride], level.codec)


def joined_batch(synth_data, store, keys, keep_encoded):
    dataset = CocoDetection(synth_data, "train", store_views(store))
    if open_store(str(store)).manifest.format == "wds":
        stream = StoreStream(dataset, store, shuffle_buffer=1, keep_encoded=keep_encoded)
        items = {(item["image_id"], item["view_index"]): item for item in stream}
        return collate([items[(dataset.image_ids[i], v)] for i, v in keys])
    joined = StoreJoinedDataset(dataset, store, keep_encoded=keep_encoded)
    return collate([joined[key] for key in keys])


@pytest.mark.parametrize("name", ALL_STORES)
def test_training_loss_is_the_same_whether_workers_or_the_device_decode(synth_data, stores, name):
    keys = [(0, 0), (1, 0), (5, 0), (6, 0)]  # a ragged batch: 128 and 96 px high images
    decoded, encoded = (joined_batch(synth_data, stores[name], keys, keep) for keep in (False, True))
    assert all(isinstance(value, EncodedMap) for item in encoded for value in item["teacher_features"].values())
    assert all(isinstance(value, torch.Tensor) for item in decoded for value in item["teacher_features"].values())
    generator = torch.Generator().manual_seed(0)
    student = {}
    for s, t in INDEX_PAIRS:  # student maps correlated with the teacher's, so the cross term matters
        full = [item["teacher_features"][t] for item in decoded if t not in item.get("teacher_sums", {})]
        channels = full[0].shape[0] if full else decoded[0]["teacher_features"][t].shape[0]
        noise = torch.randn(len(keys), channels, 128 // s, 128 // s, generator=generator)
        student[s] = noise + (torch.nn.functional.adaptive_avg_pool2d(pad_teacher_maps(
            [{t: m} for m in full], (128, 128))[t], 128 // s) if full else 0)
    images = [item["image"] for item in decoded]
    losses = [distillation_loss(student, batch, images, Distillation(INDEX_PAIRS, 1.0), 32, torch.device("cpu"))
              for batch in (decoded, encoded)]
    assert losses[0].item() > 0.1
    if "pca" in name:  # float32 vs float64 decode
        assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5)
    else:
        assert losses[1].item() == losses[0].item()


def test_the_writer_refuses_levels_encoded_with_another_codec_or_dtype(stores):
    store = open_store(str(stores["zarr-fp16"]))
    store.keep_encoded = True
    sample = store.read(0)
    from storage.zarr_store import ZarrWriter
    from storage.files import Location

    writer = ZarrWriter(Location(str(stores["zarr-fp16"])), store.manifest)
    wrong = dict(sample.features)
    wrong[4] = EncodedLevel("int8", CODECS["int8"].encode(np.zeros(tuple(sample.features[4].shape), np.float32)))
    with pytest.raises(StoreError, match="codec int8"):
        writer.encode_level(type(sample)(**{**vars(sample), "features": wrong}), 4)
    wrong[4] = EncodedLevel("fp16", {"values": sample.features[4].parts["values"].astype(np.float32)})
    with pytest.raises(StoreError, match="float32"):
        writer.encode_level(type(sample)(**{**vars(sample), "features": wrong}), 4)


def test_the_stream_shuffle_buffer_is_bounded_in_bytes(synth_data, stores):
    manifest = open_store(str(stores["zarr-fp16"])).manifest
    dataset = CocoDetection(synth_data, "train", store_views(stores["zarr-fp16"]))
    small = StoreStream(dataset, stores["zarr-fp16"], shuffle_buffer=256)
    assert small.buffer_items(manifest) == 256  # tiny maps: the item count binds
    coco = manifest.__class__.from_json(manifest.to_json())
    for level in coco.levels:  # the paper's maps at 800 x 1344 px, 256 channels
        level.channels, level.max_height, level.max_width = 256, 800 // level.stride, 1344 // level.stride
    items = small.buffer_items(coco)
    item_bytes = 4 * sum(256 * (800 // s) * (1344 // s) for s in (4, 8, 16, 32)) + 12 * 800 * 1344
    assert items == SHUFFLE_BUFFER_BYTES // item_bytes and 5 < items < 20
    encoded = StoreStream(dataset, stores["zarr-fp16"], shuffle_buffer=256, keep_encoded=True)
    assert encoded.buffer_items(coco) > items  # fp16 maps held as stored: more of them fit
