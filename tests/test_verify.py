"""verify's per-level verdict (stages/verify.py): the threshold is the codec registration's ``min_pearson_r``, or,
for a codec that names none, the codec's own round trip of the recomputed map less ROUND_TRIP_SLACK.
(End-to-end verify runs on real stores are in tests/test_extract.py and tests/test_projection.py.)"""

import numpy as np
import pytest

from stages.verify import ROUND_TRIP_SLACK, UNCOMPARED_MIN_R, compare_level, pearson_r, summary
from storage import CODECS, Sample
from storage.testing import smooth_features


def fresh_level() -> dict[str, float]:
    return {"min_r": 1.0, "max_abs_error": 0.0}


def test_a_registered_threshold_decides_the_verdict():
    assert CODECS["fp16"].min_pearson_r is not None
    passing = summary(2, "fp16", [], {4: {**fresh_level(), "min_r": 0.99995}}, samples=3)
    assert passing["ok"] and passing["threshold"] == CODECS["fp16"].min_pearson_r
    failing = summary(2, "fp16", [], {4: {**fresh_level(), "min_r": 0.99985}}, samples=3)
    assert not failing["ok"] and "stride 4 r below" in failing["text"]
    assert summary(2, "int8", [], {4: {**fresh_level(), "min_r": 0.99985}}, samples=3)["ok"]


def test_a_codec_without_a_threshold_is_held_to_its_own_round_trip():
    features = smooth_features(np.random.default_rng(0), channels=8, height=12, width=10)
    codec = CODECS["int2"]
    assert codec.min_pearson_r is None
    stored = Sample(index=0, image_id=1, view_index=0, image_hw=(48, 40), features={8: codec.decode(codec.encode(features))})
    level = fresh_level()
    assert compare_level(level, stored, 8, features, None, codec) is None
    own = pearson_r(stored.features[8], features)
    assert level["threshold"] == pytest.approx(own - ROUND_TRIP_SLACK) and level["min_r"] == pytest.approx(own)
    assert summary(1, "int2", [], {8: level}, samples=1)["ok"]
    assert summary(1, "int2", [], {8: fresh_level()}, samples=0)["threshold"] == UNCOMPARED_MIN_R
    other = codec.decode(codec.encode(features[::-1].copy()))  # another map's round trip: r far below its own
    too_coarse = Sample(index=0, image_id=1, view_index=0, image_hw=(48, 40), features={8: other})
    worse = fresh_level()
    compare_level(worse, too_coarse, 8, features, None, codec)
    assert not summary(1, "int2", [], {8: worse}, samples=1)["ok"]


def test_a_stored_map_of_another_shape_is_a_problem():
    features = smooth_features(np.random.default_rng(1), channels=4, height=6, width=6)
    stored = Sample(index=0, image_id=1, view_index=0, image_hw=(24, 24), features={4: features[:, :5]})
    assert "stored shape (4, 5, 6)" in compare_level(fresh_level(), stored, 4, features, None, CODECS["fp32"])
