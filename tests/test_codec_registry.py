"""One registration per codec (storage/codecs/codec.py, pkd_offline/device_codecs.py): every codec's numpy half in
``CODECS`` and its torch twin in ``DEVICE_CODECS`` under the same name, with what verify and the CLI ask of it."""

import numpy as np
import pytest

from pkd_offline.device_codecs import DEVICE_CODECS, DeviceCodec, check_range, register_device_codec
from storage import codec_help, codec_names
from storage.codecs import CODECS, FloatCodec, map_part, needs_basis, register

# name -> (bits, needs_basis, verify's min_pearson_r (None: within ROUND_TRIP_SLACK of its own round trip))
REGISTRATIONS = {
    "fp32": (32, False, 0.99999),
    "fp16": (16, False, 0.9999),
    "int8": (8, False, 0.999),
    "int6": (6, False, None),
    "int4": (4, False, None),
    "int2": (2, False, None),
    "pca": (None, True, None),
}


def one_sided_codecs() -> list[str]:
    """Names registered in storage without a torch twin, or with a twin and no storage codec."""
    return sorted(set(CODECS) ^ set(DEVICE_CODECS))


def test_every_codec_is_registered_once_with_both_halves_its_threshold_and_description():
    assert one_sided_codecs() == []
    assert codec_names() == list(REGISTRATIONS)
    for name, (bits, basis, min_r) in REGISTRATIONS.items():
        codec, twin = CODECS[name], DEVICE_CODECS[name]
        assert (codec.name, codec.bits, codec.needs_basis, codec.min_pearson_r) == (name, bits, basis, min_r)
        assert needs_basis(name) is basis
        assert codec.description and "\n" not in codec.description
        assert f"{name}: {codec.description}" in codec_help()
        assert twin.name == name and callable(twin.encode) and callable(twin.decode)
        assert map_part(name) in codec.part_layout(4)
    assert not needs_basis("no-such-codec")


def test_a_codec_registered_on_one_side_only_is_found(monkeypatch):
    monkeypatch.setitem(CODECS, "fp64", FloatCodec("fp64", np.float64, "float64", min_pearson_r=1.0))
    assert one_sided_codecs() == ["fp64"]
    monkeypatch.delitem(CODECS, "fp64")
    monkeypatch.setitem(DEVICE_CODECS, "fp64", DeviceCodec("fp64", DEVICE_CODECS["fp32"].encode,
                                                           DEVICE_CODECS["fp32"].decode))
    assert one_sided_codecs() == ["fp64"]


def test_a_name_is_registered_once_on_each_side_and_a_twin_needs_its_storage_codec():
    with pytest.raises(ValueError, match="registered twice"):
        register(CODECS["int8"])
    with pytest.raises(ValueError, match="registered twice"):
        register_device_codec(DEVICE_CODECS["int8"])
    with pytest.raises(ValueError, match="has no storage codec"):
        register_device_codec(DeviceCodec("fp64", DEVICE_CODECS["fp32"].encode, DEVICE_CODECS["fp32"].decode))
    assert "fp64" not in DEVICE_CODECS


def test_a_set_range_flag_raises_the_twins_range_error():
    check_range("fp16", None)
    check_range("fp16", False)
    with pytest.raises(ValueError, match="fp16 range"):
        check_range("fp16", True)
    with pytest.raises(ValueError, match="int8 codec"):
        check_range("pca", True)
