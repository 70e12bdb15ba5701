"""The store manifest: what produced the features (teacher, data, views, codec) and which shards exist.

Sample layout derived from the manifest: ``n_samples = len(image_ids) * len(views)``; sample
``i = image_index * n_views + view_index``; shard ``k`` holds samples
``[k * samples_per_shard, min((k + 1) * samples_per_shard, n_samples))``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from storage.codecs import CODECS
from storage.errors import StoreError

FORMAT_VERSION = 1
FORMATS = ("zarr", "wds")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class LevelSpec:
    """One pyramid level: stride in pixels, channel count, and the largest map (H, W) over all samples."""

    stride: int
    channels: int
    max_height: int
    max_width: int


@dataclass
class ShardRecord:
    """A complete shard: its index, sample count and sha256 (hex) of its file(s)."""

    index: int
    samples: int
    sha256: str


@dataclass
class Manifest:
    """Everything a reader needs to trust and decode a store; ``teacher``, ``normalization``,
    ``views``, ``dataset`` and ``skipped`` are opaque JSON, except ``dataset["image_ids"]``."""

    format: str
    teacher: dict
    normalization: dict
    levels: list[LevelSpec]
    codec: str
    views: list[dict]
    dataset: dict
    samples_per_shard: int
    shards: list[ShardRecord] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self._validate()

    @property
    def image_ids(self) -> list[int]:
        """Image ids in store order."""
        return self.dataset["image_ids"]

    @property
    def n_views(self) -> int:
        return len(self.views)

    @property
    def n_samples(self) -> int:
        return len(self.image_ids) * self.n_views

    @property
    def n_shards(self) -> int:
        return -(-self.n_samples // self.samples_per_shard)

    @property
    def strides(self) -> list[int]:
        return [level.stride for level in self.levels]

    def shard_range(self, k: int) -> range:
        """Sample indices held by shard ``k``."""
        if not 0 <= k < self.n_shards:
            raise StoreError(f"shard {k} does not exist: the store has shards 0..{self.n_shards - 1}")
        start = k * self.samples_per_shard
        return range(start, min(start + self.samples_per_shard, self.n_samples))

    def to_json(self) -> str:
        try:
            return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"
        except (TypeError, ValueError) as error:
            raise StoreError(f"manifest holds a value JSON cannot store ({error}): pass plain numbers, "
                             "strings, lists and dicts") from None

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse and strictly validate; StoreError on malformed JSON, wrong types or keys, or an unknown version."""
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
            raise StoreError(f"manifest is not valid JSON ({type(error).__name__}: {str(error)[:200]}): the store is "
                             "damaged; re-run extraction") from None
        if not isinstance(raw, dict):
            raise StoreError("manifest is not a JSON object: the store is damaged; re-run extraction")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(
                f"manifest format_version {version!r} is not supported (this code reads version {FORMAT_VERSION}): "
                "use a matching pkd-offline version or re-run extraction"
            )
        expected = {
            "format": str, "teacher": dict, "normalization": dict, "levels": list, "codec": str,
            "views": list, "dataset": dict, "samples_per_shard": int, "shards": list,
            "skipped": list, "format_version": int,
        }
        _check_keys("manifest", raw, expected)
        levels = [LevelSpec(**_check_keys("manifest level", item, dict.fromkeys(
            ("stride", "channels", "max_height", "max_width"), int))) for item in raw["levels"]]
        shards = [ShardRecord(**_check_keys("manifest shard", item, {"index": int, "samples": int, "sha256": str}))
                  for item in raw["shards"]]
        for name in ("views", "skipped"):
            if not all(isinstance(item, dict) for item in raw[name]):
                raise StoreError(f"manifest {name} must be a list of objects: the store is damaged; re-run extraction")
        return cls(**{**raw, "levels": levels, "shards": shards})

    def compatible_with(self, other: Manifest) -> list[str]:
        """Differences that make ``other`` a different job, as ``"field: <self> vs <other>"`` lines ([] = same job).

        Compares format, teacher, normalization, levels, codec, views, dataset and samples_per_shard;
        not the shards written or the images skipped.
        """
        # Compare as JSON sees them (tuples become lists, dict keys strings), as a stored manifest is read back.
        mine, theirs = json.loads(self.to_json()), json.loads(other.to_json())
        differences: list[str] = []
        for name in ("format", "teacher", "normalization", "levels", "codec", "views", "dataset",
                     "samples_per_shard"):
            _diff(name, mine[name], theirs[name], differences)
        return differences

    def _validate(self) -> None:
        def fail(what: str) -> None:
            raise StoreError(f"invalid manifest: {what}")

        if self.format not in FORMATS:
            fail(f"format {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.codec not in CODECS:
            fail(f"codec {self.codec!r} is unknown; known codecs: {', '.join(sorted(CODECS))}")
        if not _is_int(self.samples_per_shard) or self.samples_per_shard < 1:
            fail(f"samples_per_shard must be a positive integer, got {self.samples_per_shard!r}")
        if not self.levels:
            fail("no levels")
        for level in self.levels:
            values = (level.stride, level.channels, level.max_height, level.max_width)
            if not all(_is_int(v) and v > 0 for v in values):
                fail(f"level {level} must have positive integer stride, channels, max_height and max_width")
        strides = self.strides
        if strides != sorted(set(strides)):
            fail(f"level strides {strides} must be unique and sorted")
        if not self.views:
            fail("no views")
        image_ids = self.dataset.get("image_ids")
        if not isinstance(image_ids, list) or not all(_is_int(i) for i in image_ids):
            fail("dataset.image_ids must be a list of integer image ids")
        if len(set(image_ids)) != len(image_ids):
            fail("dataset.image_ids has duplicates")
        seen: set[int] = set()
        for record in self.shards:
            if not (_is_int(record.index) and 0 <= record.index < self.n_shards) or record.index in seen:
                fail(f"shard record {record.index!r} is out of range 0..{self.n_shards - 1} or repeated")
            seen.add(record.index)
            if record.samples != len(self.shard_range(record.index)):
                fail(f"shard {record.index} records {record.samples} samples, expected "
                     f"{len(self.shard_range(record.index))}")
            if not isinstance(record.sha256, str) or not _SHA256.match(record.sha256):
                fail(f"shard {record.index} sha256 {record.sha256!r} is not 64 lowercase hex digits")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_keys(what: str, raw: Any, expected: dict[str, type]) -> dict:
    if not isinstance(raw, dict):
        raise StoreError(f"{what} must be a JSON object, got {type(raw).__name__}: the store is damaged")
    missing = sorted(set(expected) - set(raw))
    unknown = sorted(set(raw) - set(expected))
    if missing or unknown:
        raise StoreError(f"{what} has missing keys {missing} / unknown keys {unknown}: the store is damaged "
                         "or was written by another version")
    for key, kind in expected.items():
        ok = _is_int(raw[key]) if kind is int else isinstance(raw[key], kind)
        if not ok:
            raise StoreError(f"{what} field {key!r} must be {kind.__name__}, got {type(raw[key]).__name__}")
    return raw


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _diff(path: str, mine: Any, theirs: Any, out: list[str]) -> None:
    if mine == theirs:
        return
    if isinstance(mine, dict) and isinstance(theirs, dict):
        for key in sorted(set(mine) | set(theirs), key=str):
            _diff(f"{path}.{key}", mine.get(key, "<absent>"), theirs.get(key, "<absent>"), out)
    elif isinstance(mine, list) and isinstance(theirs, list):
        if len(mine) != len(theirs):
            out.append(f"{path}: {len(mine)} entries vs {len(theirs)} entries")
            return
        first = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
        _diff(f"{path}[{first}]", mine[first], theirs[first], out)
    else:
        out.append(f"{path}: {_short(mine)} vs {_short(theirs)}")
