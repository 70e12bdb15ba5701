"""What both store formats share: the writer and reader interfaces, sample validation, completion and finalize.

A format subclasses ``StoreWriter`` (implementing ``_write_shard_files``) and ``StoreReader``
(implementing ``read``, ``_iter_shard``, ``_shard_files``, ``_shard_sha256`` and ``bytes_on_disk``).
Both work on a ``Location``: a local directory or an fsspec URL (``s3://bucket/f.zarr``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from storage.codecs import CODECS, Codec, EncodedLevel, map_shape, needs_basis
from storage.errors import StoreError
from storage.files import (MANIFEST_NAME, Location, atomic_write_bytes, marker_name, read_markers, remove_file,
                           write_marker)
from storage.manifest import STATISTIC_PARTS, Manifest, ShardRecord
from storage.pca_basis import LevelBasis, read_side, side_sha256
from storage.sample import Sample


def load_bases(location: Location, manifest: Manifest) -> dict[int, LevelBasis]:
    """The store's codec side information, {stride: LevelBasis} ({} for a codec without any); StoreError (one
    line) if the side file is missing, its sha256 is not the manifest's, or its arrays are wrong."""
    side = manifest.codec_side
    if side is None:
        return {}
    where = location.url(side["file"])
    location.refresh(side["file"])
    if not location.isfile(side["file"]):
        raise StoreError(f"{where} is missing: the {manifest.codec} codec's basis is gone; re-extract the store")
    data = location.fs.cat_file(location.path(side["file"]))
    if side_sha256(data) != side["sha256"]:
        raise StoreError(f"{where} has sha256 {side_sha256(data)[:12]}..., the manifest {side['sha256'][:12]}...: "
                         "the codec's basis is damaged or changed; re-extract the store")
    return read_side(data, {level.stride: level.channels for level in manifest.levels}, where)


class LevelCodecs:
    """The codec of each level: the manifest's codec, bound to the level's basis when it needs one (loaded on
    first use, so a writer can exist before extraction has written the side file)."""

    def __init__(self, location: Location, manifest: Manifest) -> None:
        self.location, self.manifest = location, manifest
        self.codec: Codec = CODECS[manifest.codec]
        self._bases: dict[int, LevelBasis] | None = None if needs_basis(manifest.codec) else {}

    @property
    def bases(self) -> dict[int, LevelBasis]:
        if self._bases is None:
            self._bases = load_bases(self.location, self.manifest)
        return self._bases

    def __getitem__(self, stride: int) -> Codec:
        return self.codec.bound(self.bases[stride]) if self.bases else self.codec


class StoreHandle:
    """One store's place and description: ``location`` (``root``, its string), ``manifest``, the ``codec`` it names
    and ``level_codecs`` (the codec bound to each level's basis, where it has one)."""

    def __init__(self, location: Location, manifest: Manifest) -> None:
        self.location = location
        self.root = str(location)
        self.manifest = manifest
        self.codec: Codec = CODECS[manifest.codec]
        self.level_codecs = LevelCodecs(location, manifest)


class StoreWriter(StoreHandle):
    """Writes shards of one store; several processes may write disjoint shards of the same store."""

    def completed_shards(self) -> set[int]:
        """Indices of shards whose data and marker are written (resume skips them)."""
        return set(read_markers(self.location))

    def write_shard(self, shard_index: int, samples: list[Sample]) -> ShardRecord:
        """Encode and write shard ``shard_index``; ``samples`` must be exactly ``manifest.shard_range(k)`` in order.

        Atomic: the shard is complete (marker written last) or absent; rewriting a shard first
        withdraws its marker.
        """
        self._validate(shard_index, samples)
        remove_file(self.location, marker_name(shard_index))
        sha256 = self._write_shard_files(shard_index, samples)
        write_marker(self.location, shard_index, len(samples), sha256)
        return ShardRecord(index=shard_index, samples=len(samples), sha256=sha256)

    def finalize(self) -> Manifest:
        """Write ``manifest.json`` listing every shard (atomically); StoreError if any shard is missing."""
        markers = read_markers(self.location)
        missing = [k for k in range(self.manifest.n_shards) if k not in markers]
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise StoreError(f"store {self.root} is missing {len(missing)} of {self.manifest.n_shards} shards "
                             f"({shown}): re-run extraction to resume it")
        self.manifest.shards = [ShardRecord(**markers[k]) for k in range(self.manifest.n_shards)]
        self.manifest._validate()
        write_manifest(self.location, self.manifest)
        return self.manifest

    def _write_shard_files(self, shard_index: int, samples: list[Sample]) -> str:
        """Write the shard's data files, replacing any partial ones; return their sha256."""
        raise NotImplementedError

    def encode_level(self, sample: Sample, stride: int) -> dict[str, np.ndarray]:
        """Every stored part of one level of ``sample`` (``manifest.level_parts``): the codec's, plus the
        float64 sums of a projected level."""
        features = sample.features[stride]
        parts = self._checked_parts(features, stride) if isinstance(features, EncodedLevel) \
            else self.level_codecs[stride].encode(features)
        if stride in self.manifest.projected_strides:
            parts.update({name: np.asarray(sample.statistics[stride][name], "<f8") for name in STATISTIC_PARTS})
        return parts

    def _checked_parts(self, level: EncodedLevel, stride: int) -> dict[str, np.ndarray]:
        """The parts of a level encoded before it reached the writer, refused (StoreError) unless they are
        exactly what the manifest's codec writes: its part names, dtypes, and one (C, H, W) map size."""
        layout = self.codec.part_layout(0)
        shape = level.shape
        problems = [] if level.codec == self.codec.name and set(level.parts) == set(layout) else \
            [f"codec {level.codec} parts {sorted(level.parts)}"]
        for name, (dtype, kind) in layout.items() if not problems else ():
            part = np.asarray(level.parts[name])
            if part.dtype.newbyteorder("=") != dtype.newbyteorder("=") or \
                    part.shape != (shape if kind == "map" else shape[:1]):
                problems.append(f"part {name!r} {part.dtype} {part.shape}")
        if problems:
            raise StoreError(f"stride {stride}: encoded level has {problems[0]}, the store's codec {self.codec.name} "
                             f"writes {[(name, str(dtype)) for name, (dtype, _) in layout.items()]}")
        return {name: np.asarray(level.parts[name]) for name in layout}

    def _validate(self, shard_index: int, samples: list[Sample]) -> None:
        manifest = self.manifest
        expected = manifest.shard_range(shard_index)
        if len(samples) != len(expected):
            raise StoreError(f"shard {shard_index} needs {len(expected)} samples "
                             f"({expected.start}..{expected.stop - 1}), got {len(samples)}")
        for index, sample in zip(expected, samples):
            where = f"sample {sample.index} (image {sample.image_id}, view {sample.view_index})"
            image_index, view_index = divmod(index, manifest.n_views)
            if (sample.index, sample.image_id, sample.view_index) != (index, manifest.image_ids[image_index],
                                                                      view_index):
                raise StoreError(f"{where} is out of place in shard {shard_index}: position {index} holds "
                                 f"image {manifest.image_ids[image_index]}, view {view_index}")
            if sorted(sample.features) != manifest.strides:
                raise StoreError(f"{where} has strides {sorted(sample.features)}, the manifest {manifest.strides}")
            if len(sample.image_hw) != 2:
                raise StoreError(f"{where} image_hw must be (height, width), got {sample.image_hw}")
            for stride in manifest.projected_strides:
                sums = sample.statistics.get(stride, {})
                channels = next(level.channels for level in manifest.levels if level.stride == stride)
                if sorted(sums) != sorted(STATISTIC_PARTS) or any(
                        np.shape(sums[name]) != (channels,) or not np.isfinite(sums[name]).all() for name in sums):
                    raise StoreError(f"{where} stride {stride} is projected and needs finite {list(STATISTIC_PARTS)} "
                                     f"of shape ({channels},), got {sorted(sums)}")
            for level in manifest.levels:
                shape = map_shape(sample.features[level.stride])
                if (len(shape) != 3 or shape[0] != level.channels or shape[1] > level.max_height
                        or shape[2] > level.max_width):
                    raise StoreError(f"{where} stride {level.stride} map has shape {shape}; the manifest allows "
                                     f"({level.channels}, <={level.max_height}, <={level.max_width})")


class StoreReader(StoreHandle):
    """Reads a finalized store: random access by sample index, or streaming shard by shard."""

    def __init__(self, location: Location, manifest: Manifest) -> None:
        super().__init__(location, manifest)
        self.level_codecs.bases  # a missing or damaged basis is refused when the store is opened
        self._image_index: dict[int, int] | None = None
        # True: samples keep each level as its codec stores it (EncodedLevel), checked but not decoded,
        # so a training device can decode it (``pkd_offline.stored_maps``); False: float32 maps.
        self.keep_encoded = False

    def __len__(self) -> int:
        return self.manifest.n_samples

    def read(self, index: int) -> Sample:
        """Sample ``index`` with float32 features (or, with ``keep_encoded``, EncodedLevels) cropped to its own
        map sizes."""
        raise NotImplementedError

    def iter_samples(self, shard_indices: Iterable[int] | None = None) -> Iterator[Sample]:
        """Samples in order, shard by shard (all shards by default); memory stays flat."""
        shards = range(self.manifest.n_shards) if shard_indices is None else shard_indices
        for k in shards:
            self.manifest.shard_range(k)
            yield from self._iter_shard(k)

    def index_of(self, image_id: int, view_index: int) -> int:
        """Sample index of ``image_id`` under view ``view_index``."""
        if self._image_index is None:
            self._image_index = {image_id: i for i, image_id in enumerate(self.manifest.image_ids)}
        if image_id not in self._image_index:
            raise StoreError(f"image {image_id} is not in the store {self.root}: extract it or check the data set")
        if not 0 <= view_index < self.manifest.n_views:
            raise StoreError(f"view {view_index} is not in the store {self.root} ({self.manifest.n_views} views)")
        return self._image_index[image_id] * self.manifest.n_views + view_index

    def shard_paths(self, k: int) -> list[str]:
        """Paths of the files that make shard ``k`` (URLs for a remote store)."""
        return [self.location.url(name) for name in self._shard_files(k)]

    def bytes_on_disk(self) -> dict:
        """{"levels": {stride: bytes of that level's feature data}, "total": bytes of the whole store}."""
        raise NotImplementedError

    def verify_shards(self) -> list[str]:
        """Recompute every shard's sha256 against the manifest; one problem line per bad shard ([] = intact)."""
        problems = []
        try:
            load_bases(self.location, self.manifest)
        except StoreError as error:
            problems.append(str(error))
        recorded = {record.index: record for record in self.manifest.shards}
        for k in range(self.manifest.n_shards):
            if k not in recorded:
                problems.append(f"shard {k}: not listed in the manifest; re-run extraction")
                continue
            missing = [self.location.url(name) for name in self._shard_files(k) if not self.location.isfile(name)]
            if missing:
                problems.append(f"shard {k}: missing file {missing[0]}; re-extract the shard")
            elif (actual := self._shard_sha256(k)) != recorded[k].sha256:
                problems.append(f"shard {k}: sha256 {actual[:12]}... differs from the manifest's "
                                f"{recorded[k].sha256[:12]}... ({self.shard_paths(k)[0]} and siblings are "
                                "damaged or changed); re-extract the shard")
        return problems

    def _iter_shard(self, k: int) -> Iterator[Sample]:
        raise NotImplementedError

    def _shard_files(self, k: int) -> list[str]:
        """The files of shard ``k``, relative to the store root, in ``shard_paths`` order."""
        raise NotImplementedError

    def _shard_sha256(self, k: int) -> str:
        raise NotImplementedError

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self):
            raise StoreError(f"sample {index} is out of range: the store {self.root} has {len(self)} samples")

    def _decode_level(self, stride: int, parts: dict[str, np.ndarray], hw: tuple[int, int],
                      where: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Check each part's dtype and shape against ``manifest.level_parts``, then decode: the float32
        (C, H, W) map (the EncodedLevel with ``keep_encoded``), and the float64 sums {"sum", "sum_sq"} of a projected level ({} otherwise)."""
        channels = next(level.channels for level in self.manifest.levels if level.stride == stride)
        layout = self.manifest.level_parts(stride)
        if set(parts) != set(layout):
            raise StoreError(f"{where} stride {stride} has parts {sorted(parts)}, codec {self.codec.name} and layout "
                             f"{self.manifest.layout['name']} need {sorted(layout)}: the store is damaged; "
                             "re-extract it")
        for name, (dtype, kind) in layout.items():
            shape = (channels, *hw) if kind == "map" else (channels,)
            part = parts[name]
            if part.dtype.kind not in "biuf" or part.dtype.newbyteorder("=") != dtype.newbyteorder("=") \
                    or part.shape != shape:
                raise StoreError(f"{where} stride {stride} part {name!r} is {part.dtype} {part.shape}, expected "
                                 f"{dtype} {shape}: the store is damaged; re-extract it")
        parts = dict(parts)
        sums = {name: np.array(parts.pop(name), np.float64) for name in STATISTIC_PARTS if name in layout}
        if not all(np.isfinite(values).all() for values in sums.values()):
            raise StoreError(f"{where} stride {stride} sums are not finite: the store is damaged; re-extract it")
        if self.keep_encoded:
            return EncodedLevel(self.codec.name, parts, self.level_codecs.bases.get(stride)), sums
        return self.level_codecs[stride].decode(parts), sums


def write_manifest(location: Location, manifest: Manifest) -> None:
    atomic_write_bytes(location, MANIFEST_NAME, manifest.to_json().encode())


def read_manifest(location: Location) -> Manifest | None:
    """The manifest of the store at ``location``, or None if there is none."""
    location.refresh()
    if not location.isfile(MANIFEST_NAME):
        return None
    path = location.url(MANIFEST_NAME)
    try:
        text = location.fs.cat_file(location.path(MANIFEST_NAME)).decode("utf-8")
    except UnicodeDecodeError as error:
        raise StoreError(f"manifest {path} is not UTF-8 text ({error}): the store is damaged; re-run extraction") \
            from None
    return Manifest.from_json(text)
