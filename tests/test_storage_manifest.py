"""Manifest: JSON round trip, strict validation, sample layout, and job comparison."""

import dataclasses
import json

import pytest

from storage import LevelSpec, Manifest, ShardRecord, StoreError
from storage.manifest import FORMAT_VERSION
from storage.testing import tiny_manifest


@pytest.fixture
def manifest() -> Manifest:
    return tiny_manifest(image_ids=[3, 1, 2, 9], n_views=2, samples_per_shard=3)


def test_json_round_trip(manifest):
    manifest.shards = [ShardRecord(index=0, samples=3, sha256="a" * 64)]
    manifest.skipped = [{"image_id": 5, "reason": "corrupt JPEG"}]
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest
    assert isinstance(again.levels[0], LevelSpec) and isinstance(again.shards[0], ShardRecord)
    assert json.loads(manifest.to_json())["format_version"] == FORMAT_VERSION


def test_sample_layout(manifest):
    assert manifest.n_samples == 8 and manifest.n_shards == 3
    assert [manifest.shard_range(k) for k in range(3)] == [range(0, 3), range(3, 6), range(6, 8)]
    with pytest.raises(StoreError, match="shard 3 does not exist"):
        manifest.shard_range(3)


def _edited(manifest: Manifest, edit) -> str:
    raw = json.loads(manifest.to_json())
    edit(raw)
    return json.dumps(raw)


@pytest.mark.parametrize("edit, message", [
    (lambda raw: raw.update(extra=1), "unknown keys"),
    (lambda raw: raw.pop("codec"), "missing keys"),
    (lambda raw: raw.update(samples_per_shard="3"), "samples_per_shard"),
    (lambda raw: raw.update(samples_per_shard=True), "samples_per_shard"),
    (lambda raw: raw.update(format_version=2), "format_version 2 is not supported"),
    (lambda raw: raw.pop("format_version"), "format_version None"),
    (lambda raw: raw.update(codec="bf4"), "codec 'bf4' is unknown"),
    (lambda raw: raw.update(format="hdf5"), "format 'hdf5'"),
    (lambda raw: raw["levels"].reverse(), "sorted"),
    (lambda raw: raw["levels"][0].update(channels=0), "positive"),
    (lambda raw: raw["levels"][0].pop("stride"), "missing keys"),
    (lambda raw: raw["dataset"].pop("image_ids"), "image_ids"),
    (lambda raw: raw["dataset"].update(image_ids=[1, 1]), "duplicates"),
    (lambda raw: raw.update(views=[]), "no views"),
    (lambda raw: raw.update(shards=[{"index": 0, "samples": 3, "sha256": "xyz"}]), "sha256"),
    (lambda raw: raw.update(shards=[{"index": 7, "samples": 3, "sha256": "a" * 64}]), "out of range"),
    (lambda raw: raw.update(shards=[{"index": 2, "samples": 3, "sha256": "a" * 64}]), "expected 2"),
])
def test_strict_validation(manifest, edit, message):
    with pytest.raises(StoreError, match=message):
        Manifest.from_json(_edited(manifest, edit))


def test_malformed_json_is_refused():
    with pytest.raises(StoreError, match="not valid JSON"):
        Manifest.from_json("{not json")
    with pytest.raises(StoreError, match="JSON object"):
        Manifest.from_json("[1, 2]")


def test_same_job_is_compatible_whatever_was_written(manifest):
    other = dataclasses.replace(manifest, shards=[ShardRecord(0, 3, "b" * 64)], skipped=[{"image_id": 4}])
    assert manifest.compatible_with(other) == []


def test_differences_are_listed(manifest):
    other = tiny_manifest(image_ids=[3, 1, 2, 8], n_views=2, samples_per_shard=3, codec="int8")
    other.teacher["checkpoint_sha256"] = "f" * 64
    differences = manifest.compatible_with(other)
    text = "\n".join(differences)
    assert len(differences) == 3
    assert "teacher.checkpoint_sha256" in text and "codec" in text and "dataset.image_ids[3]: 9 vs 8" in text
    fewer_levels = tiny_manifest(image_ids=[3, 1, 2, 9], strides=(8,))
    assert manifest.compatible_with(fewer_levels) == ["levels: 2 entries vs 1 entries"]


def test_comparison_is_as_stored_json(manifest):
    """A job's manifest with tuples or int keys must match its own stored (JSON) manifest on resume."""
    manifest.views[0]["size"] = (800, 1333)
    manifest.teacher["levels"] = {3: "p3"}
    stored = Manifest.from_json(manifest.to_json())
    assert stored.compatible_with(manifest) == []
