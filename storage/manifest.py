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

import numpy as np

from storage.codecs import CODECS, needs_basis
from storage.pca_basis import SIDE_NAME
from storage.errors import StoreError

FORMAT_VERSION = 1
FORMATS = ("zarr", "wds")
LAYOUTS = ("full", "projected")
# A projected level's per-image, per-channel sums over the valid region: float64 (C,) parts beside the codec's.
STATISTIC_PARTS = ("sum", "sum_sq")
_PROJECTED_KEYS = ("name", "pairing", "pairs", "projected", "resize", "size_divisor")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def shard_span(k: int, samples_per_shard: int, n_samples: int) -> range:
    """Sample indices held by shard ``k`` of a store of ``n_samples`` samples, ``samples_per_shard`` per shard."""
    start = k * samples_per_shard
    return range(start, min(start + samples_per_shard, n_samples))


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
    ``views``, ``dataset`` and ``skipped`` are opaque JSON, except ``dataset["image_ids"]``.

    ``layout`` says what a level holds: ``{"name": "full"}`` (every level the teacher's map), or
    ``{"name": "projected", "pairing": "index", "pairs": [[student_stride, teacher_stride], ...],
    "projected": [teacher strides], "resize": "bilinear, align_corners=False", "size_divisor": px}``:
    the levels in ``projected`` hold ``U^T (valid * t)`` at the paired student stride (one row and
    column past the image's valid student map) plus the float64 parts ``sum`` and ``sum_sq`` (C,);
    the other levels the full map. Exact for batches padded to multiples of ``size_divisor``.

    ``categories`` is the annotation file's ``[{"id", "name"}, ...]`` sorted by id (contiguous label
    ``i + 1`` is ``categories[i]``), so a store written with images can feed training alone; ``None``
    in stores written before it was recorded.

    ``codec_side`` is ``{"file": "codec_side.npz", "sha256": hex, "step": float}`` for a codec that needs
    side information (``pca``: its bases, ``storage.pca_basis``, written before the first shard), else ``None``.
    """

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
    layout: dict = field(default_factory=lambda: {"name": "full"})
    categories: list[dict] | None = None
    codec_side: dict | None = None
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

    @property
    def projected_strides(self) -> list[int]:
        """Teacher strides whose level holds the projection (empty for the full layout)."""
        return list(self.layout.get("projected", []))

    def level_parts(self, stride: int) -> dict[str, tuple[np.dtype, str]]:
        """Every stored part of level ``stride``: the codec's parts, plus the float64 sums when projected."""
        channels = next(level.channels for level in self.levels if level.stride == stride)
        parts = dict(CODECS[self.codec].part_layout(channels))
        if stride in self.projected_strides:
            parts.update({name: (np.dtype("<f8"), "channel") for name in STATISTIC_PARTS})
        return parts

    def shard_range(self, k: int) -> range:
        """Sample indices held by shard ``k``."""
        if not 0 <= k < self.n_shards:
            raise StoreError(f"shard {k} does not exist: the store has shards 0..{self.n_shards - 1}")
        return shard_span(k, self.samples_per_shard, self.n_samples)

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
        if "layout" not in raw:  # stores written before layouts hold full maps
            raw["layout"] = {"name": "full"}
        if "categories" not in raw:  # stores written before categories were recorded
            raw["categories"] = None
        if "codec_side" not in raw:  # stores written before codecs had side information
            raw["codec_side"] = None
        expected = {
            "layout": dict, "format": str, "teacher": dict, "normalization": dict, "levels": list, "codec": str,
            "views": list, "dataset": dict, "samples_per_shard": int, "shards": list,
            "skipped": list, "format_version": int, "categories": object,  # categories: checked by _validate
            "codec_side": object,  # checked by _validate
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

        Compares format, teacher, normalization, levels, codec, views, dataset, samples_per_shard, layout and the
        codec side's step; not the shards written, the images skipped, the categories (which follow from the
        annotation file, whose sha256 ``dataset`` holds: a store written before categories were recorded resumes),
        or the side file's hash (a resumed store keeps the basis it was started with: it is never refitted).
        """
        # Compare as JSON sees them (tuples become lists, dict keys strings), as a stored manifest is read back.
        mine, theirs = json.loads(self.to_json()), json.loads(other.to_json())
        differences: list[str] = []
        for name in ("format", "teacher", "normalization", "levels", "codec", "views", "dataset",
                     "samples_per_shard", "layout"):
            _diff(name, mine[name], theirs[name], differences)
        _diff("codec_side.step", (mine["codec_side"] or {}).get("step"), (theirs["codec_side"] or {}).get("step"),
              differences)
        return differences

    def _validate(self) -> None:
        def fail(what: str) -> None:
            raise StoreError(f"invalid manifest: {what}")

        if self.format not in FORMATS:
            fail(f"format {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.codec not in CODECS:
            fail(f"codec {self.codec!r} is unknown; known codecs: {', '.join(sorted(CODECS))}")
        side = self.codec_side
        if needs_basis(self.codec):
            if not (isinstance(side, dict) and set(side) == {"file", "sha256", "step"} and side["file"] == SIDE_NAME
                    and isinstance(side["sha256"], str) and _SHA256.match(side["sha256"])
                    and isinstance(side["step"], (int, float)) and not isinstance(side["step"], bool)
                    and side["step"] > 0):
                fail(f'codec {self.codec} needs codec_side {{"file": "{SIDE_NAME}", "sha256": 64 hex digits, '
                     f'"step": > 0}}, got {_short(side)}')
        elif side is not None:
            fail(f"codec {self.codec} takes no codec_side, got {_short(side)}")
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
        self._validate_layout(fail)
        self._validate_categories(fail)
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


    def _validate_categories(self, fail) -> None:
        categories = self.categories
        if categories is None:
            return
        if not isinstance(categories, list) or not all(
                isinstance(c, dict) and set(c) == {"id", "name"} and _is_int(c["id"]) and isinstance(c["name"], str)
                for c in categories):
            fail('categories must be a list of {"id": integer, "name": string} objects')
        ids = [c["id"] for c in categories]
        if ids != sorted(set(ids)):
            fail(f"category ids {ids[:10]} must be unique and sorted")

    def _validate_layout(self, fail) -> None:
        layout = self.layout
        if not isinstance(layout, dict) or layout.get("name") not in LAYOUTS:
            fail(f"layout {layout!r} must be an object whose name is one of {', '.join(LAYOUTS)}")
        if layout["name"] == "full":
            if set(layout) != {"name"}:
                fail(f"layout full takes no other keys, got {sorted(layout)}")
            return
        if sorted(layout) != sorted(_PROJECTED_KEYS):
            fail(f"projected layout needs keys {list(_PROJECTED_KEYS)}, got {sorted(layout)}")
        pairs, projected = layout["pairs"], layout["projected"]
        if not (isinstance(pairs, list) and all(isinstance(p, list) and len(p) == 2
                                                and all(_is_int(v) and v > 0 for v in p) for p in pairs)):
            fail(f"layout pairs {pairs!r} must be a list of [student_stride, teacher_stride]")
        if [t for _, t in pairs] != self.strides:
            fail(f"layout pairs {pairs} must name every level's teacher stride {self.strides} once, in order")
        if not (isinstance(projected, list) and all(_is_int(v) for v in projected)
                and set(projected) <= set(self.strides)):
            fail(f"layout projected {projected!r} must list teacher strides of the store's levels")
        if not (_is_int(layout["size_divisor"]) and layout["size_divisor"] > 0):
            fail(f"layout size_divisor {layout['size_divisor']!r} must be a positive integer")
        for student, teacher in pairs:
            if teacher in projected and (student != 2 * teacher or layout["size_divisor"] % student):
                fail(f"layout projects teacher stride {teacher} to student stride {student}: only exact 2x pairs "
                     f"whose student stride divides size_divisor {layout['size_divisor']} are projected")
        if layout["pairing"] != "index" or not isinstance(layout["resize"], str):
            fail(f"layout pairing {layout['pairing']!r} must be 'index' and resize a string")


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
