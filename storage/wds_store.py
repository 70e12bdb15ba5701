"""The WebDataset store format: a directory of plain POSIX tar shards, streamed sequentially.

Layout of ``X/`` (a local directory or an fsspec URL prefix such as ``s3://bucket/shards/``):
``shard-{k:06d}.tar`` (written as webdataset's TarWriter writes it, to a local temporary file, mtime 0 so
equal content gives equal bytes, then renamed into place or uploaded in one piece),
``shards/{k:06d}.json`` markers and ``manifest.json``. A sample
is the member group with key ``{index:09d}``:

- ``meta.json``: {"image_id", "view_index", "image_hw": [h, w] pixels,
  "feature_hw": {"<stride>": [h, w]}}
- ``s{stride}.{part}.npy.zst``: ``np.save`` bytes (no pickle) of each codec part, zstd-compressed
  (each of ``Manifest.level_parts``: the codec's, plus ``sum`` and ``sum_sq`` of a projected level)
  with a content checksum (a flipped bit in a part is a read error, not a silently wrong value)
- any ``Sample.extras`` (e.g. ``jpg``, ``boxes.json``) as raw members.

Shards are written and read with the standard library's tarfile (never webdataset, which imports torch), as
raw bytes decoded here: a part must be a plain numeric ``.npy`` (parsed with numpy's format
functions, never ``np.load``, so neither pickles nor ``.npz`` archives are opened) whose declared
size fits the manifest, so a hostile shard cannot make the reader allocate more than the
manifest's largest map; pickle-capable members (.pyd, .pickle, .pkl, .pth, .pt) are refused.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import os
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numcodecs import Zstd

from storage.base import StoreReader, StoreWriter
from storage.codecs import map_shape
from storage.errors import StoreError
from storage.files import Location, sha256_file, sha256_local_file, staged_file
from storage.manifest import Manifest
from storage.sample import Sample

PICKLE_EXTENSIONS = frozenset({"pyd", "pickle", "pkl", "pth", "pt"})
_PART = re.compile(r"^s(\d+)\.([A-Za-z0-9_]+)\.npy(\.zst)?$")
_EXTRA = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_ZSTD = Zstd(level=3, checksum=True)
_NPY_HEADER_LIMIT = 4096  # bytes; numpy writes 128
_TAR_BLOCK = 512


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.tar"


def create_wds(location: Location, manifest: Manifest) -> WdsWriter:
    """Open a writer for the (possibly empty) WebDataset store at ``location``."""
    return WdsWriter(location, manifest)


@contextlib.contextmanager
def _open_tar(location: Location, name: str, mode: str) -> Iterator[tarfile.TarFile]:
    """Open shard tar ``name`` ("r:" random access, "r|" streaming); StoreError naming it if missing or unreadable."""
    where = location.url(name)
    try:
        handle = location.fs.open(location.path(name), "rb")
    except OSError as error:
        raise StoreError(f"shard {where} cannot be opened ({error}): run `verify` and re-extract the shard") from None
    with handle:
        try:
            tar = tarfile.open(fileobj=handle, mode=mode)
        except (tarfile.TarError, OSError, EOFError) as error:
            raise StoreError(f"shard {where} cannot be opened ({error}): run `verify` and re-extract the shard") \
                from None
        with tar:
            yield tar


def _zstd_frame_size(data: bytes) -> int | None:
    """Decompressed size a zstd frame declares in its header (None when absent or not a zstd frame)."""
    if len(data) < 6 or data[:4] != b"\x28\xb5\x2f\xfd":
        return None
    descriptor = data[4]
    single_segment = (descriptor >> 5) & 1
    position = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 3]
    width = (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
    if width == 0 or len(data) < position + width:
        return None
    size = int.from_bytes(data[position: position + width], "little")
    return size + 256 if width == 2 else size


def _load_npy(raw: bytes, limit: int) -> np.ndarray:
    """A plain numeric array from ``.npy`` bytes; ValueError for anything else (pickles, npz, sizes past ``limit``)."""
    stream = io.BytesIO(raw)
    major, _ = np.lib.format.read_magic(stream)
    read_header = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0}.get(major)
    if read_header is None:
        raise ValueError(f".npy version {major} is not read")
    shape, fortran_order, dtype = read_header(stream, max_header_size=_NPY_HEADER_LIMIT)
    if dtype.hasobject or dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"dtype {dtype} is not a plain numeric dtype")
    count = int(np.prod(shape, dtype=object))
    if count * dtype.itemsize > limit or count * dtype.itemsize != len(raw) - stream.tell():
        raise ValueError(f"shape {shape} of {dtype} does not match its {len(raw) - stream.tell()} data bytes "
                         f"(at most {limit} allowed)")
    values = np.frombuffer(raw, dtype=dtype, count=count, offset=stream.tell())
    return values.reshape(shape[::-1]).transpose() if fortran_order else values.reshape(shape)


def _refuse_pickle(name: str, where: str) -> None:
    if name.rsplit(".", 1)[-1].lower() in PICKLE_EXTENSIONS:
        raise StoreError(f"{where}: member {name!r} may hold a pickle, which is never loaded from a store; "
                         "remove it or re-extract the shard")


_ENCODE_THREADS = min(8, os.cpu_count() or 1)


class WdsWriter(StoreWriter):
    """Writes one tar per store shard to a local temporary file, then renames or uploads it (complete or absent)."""

    def _write_shard_files(self, shard_index: int, samples: list[Sample]) -> str:
        # The standard library's tarfile, writing the bytes webdataset's TarWriter(encoder=False, mtime=0) writes
        # (members sorted per sample, mode 0o444, owner "bigdata"): webdataset would import torch, and
        # writing a store, like reading one, must not need the training stack.
        # Samples are encoded and compressed on a few threads (zstd releases the GIL), written in order.
        with staged_file(self.location, shard_name(shard_index)) as temporary, \
                ThreadPoolExecutor(_ENCODE_THREADS) as pool:
            with open(temporary, "wb") as handle, tarfile.open(fileobj=handle, mode="w|") as tar:
                for members in pool.map(self._members, samples):
                    key = members.pop("__key__")
                    for name in sorted(members):
                        data = members[name].encode() if isinstance(members[name], str) else bytes(members[name])
                        info = tarfile.TarInfo(f"{key}.{name}")
                        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "bigdata", "bigdata"
                        tar.addfile(info, io.BytesIO(data))
            return sha256_local_file(temporary)

    def _members(self, sample: Sample) -> dict[str, bytes | str]:
        meta = {"image_id": int(sample.image_id), "view_index": int(sample.view_index),
                "image_hw": [int(v) for v in sample.image_hw],
                "feature_hw": {str(s): list(map_shape(f)[1:]) for s, f in sorted(sample.features.items())}}
        members: dict[str, bytes | str] = {"__key__": f"{sample.index:09d}", "meta.json": json.dumps(meta).encode()}
        for stride in self.manifest.strides:
            for part, values in self.encode_level(sample, stride).items():
                buffer = io.BytesIO()
                np.save(buffer, np.ascontiguousarray(values), allow_pickle=False)
                members[f"s{stride}.{part}.npy.zst"] = _ZSTD.encode(buffer.getvalue())
        for name, data in sample.extras.items():
            where = f"sample {sample.index} extra"
            if not _EXTRA.match(name) or name == "meta.json" or _PART.match(name) or name.startswith("_"):
                raise StoreError(f"{where} {name!r} is not a usable member name (letters, digits, ._- and not "
                                 "meta.json or s<stride>.<part>.npy): rename it")
            _refuse_pickle(name, where)
            members[name] = bytes(data)
        return members


class WdsReader(StoreReader):
    """Streams shards with tarfile; random access indexes a shard's members once (a few shards cached)."""

    _CACHED_SHARDS = 16

    def __init__(self, location: Location, manifest: Manifest) -> None:
        super().__init__(location, manifest)
        self._indexes: dict[int, dict[str, dict[str, tuple[int, int]]]] = {}

    def _shard_files(self, k: int) -> list[str]:
        return [shard_name(k)]

    def _shard_sha256(self, k: int) -> str:
        return sha256_file(self.location, shard_name(k))

    def read(self, index: int) -> Sample:
        self._check_index(index)
        k = index // self.manifest.samples_per_shard
        path = self.location.url(shard_name(k))
        try:
            entry = self._shard_index(k).get(f"{index:09d}")
        except StoreError as error:
            raise StoreError(f"sample {index}: {error}") from None
        if entry is None:
            raise StoreError(f"shard {path} lacks sample {index}: run `verify` and re-extract the shard")
        # A sample's members are adjacent in the tar: one ranged read fetches them all.
        start = min(offset for offset, _ in entry.values())
        end = max(offset + size for offset, size in entry.values())
        try:
            block = self.location.fs.cat_file(self.location.path(shard_name(k)), start=start, end=end)
        except OSError as error:
            raise StoreError(f"shard {path} cannot be read at sample {index} ({error}): re-extract the shard") from None
        if len(block) != end - start:
            raise StoreError(f"shard {path} is truncated at sample {index}: re-extract the shard")
        members = {suffix: block[offset - start: offset - start + size] for suffix, (offset, size) in entry.items()}
        return self._sample(index, members, f"sample {index} in {path}")

    def _shard_index(self, k: int) -> dict[str, dict[str, tuple[int, int]]]:
        if k not in self._indexes:
            if len(self._indexes) >= self._CACHED_SHARDS:
                self._indexes.pop(next(iter(self._indexes)))
            index: dict[str, dict[str, tuple[int, int]]] = {}
            with _open_tar(self.location, shard_name(k), "r:") as tar:
                for member in self._members_of(self.location.url(shard_name(k)), tar):
                    key, suffix = member.name.split(".", 1)
                    index.setdefault(key, {})[suffix] = (member.offset_data, member.size)
            self._indexes[k] = index
        return self._indexes[k]

    def _iter_shard(self, k: int) -> Iterator[Sample]:
        path = self.location.url(shard_name(k))
        expected = iter(self.manifest.shard_range(k))
        key, members = None, {}
        with _open_tar(self.location, shard_name(k), "r|") as tar:
            for member in self._members_of(path, tar):
                member_key, suffix = member.name.split(".", 1)
                if member_key != key and key is not None:
                    index = self._next_index(expected, key, path)
                    yield self._sample(index, members, f"sample {index} in {path}")
                    members = {}
                key = member_key
                try:
                    members[suffix] = tar.extractfile(member).read()
                except (tarfile.TarError, EOFError, OSError) as error:
                    raise StoreError(f"shard {path} is truncated or damaged ({error}): re-extract the shard") from None
        if key is not None:
            index = self._next_index(expected, key, path)
            yield self._sample(index, members, f"sample {index} in {path}")
        if next(expected, None) is not None:
            raise StoreError(f"shard {path} ends early (truncated?): re-extract the shard")

    @staticmethod
    def _next_index(expected: Iterator[int], key: str, path: str) -> int:
        index = next(expected, None)
        if index is None or key != f"{index:09d}":
            raise StoreError(f"shard {path} holds sample key {key!r} where sample {index} belongs: re-extract it")
        return index

    @staticmethod
    def _members_of(path: str, tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
        """Regular-file members, each checked for a sample key and a non-pickle extension."""
        try:
            with tar:
                for member in tar:
                    if not member.isfile():
                        raise StoreError(f"shard {path}: member {member.name!r} is not a regular file; re-extract it")
                    if "." not in member.name or "/" in member.name:
                        raise StoreError(f"shard {path}: member {member.name!r} is not '<key>.<ext>'; re-extract it")
                    _refuse_pickle(member.name, f"shard {path}")
                    yield member
        except (tarfile.TarError, EOFError, OSError) as error:
            raise StoreError(f"shard {path} is truncated or damaged ({error}): re-extract the shard") from None

    def _sample(self, index: int, members: dict[str, bytes], where: str) -> Sample:
        manifest = self.manifest
        try:
            meta = json.loads(members.pop("meta.json"))
            image_id, view_index = int(meta["image_id"]), int(meta["view_index"])
            image_hw = (int(meta["image_hw"][0]), int(meta["image_hw"][1]))
            feature_hw = {int(s): (int(hw[0]), int(hw[1])) for s, hw in meta["feature_hw"].items()}
        except (KeyError, ValueError, TypeError, IndexError, AttributeError, OverflowError, RecursionError) as error:
            raise StoreError(f"{where}: meta.json is missing or malformed ({error}); re-extract the shard") from None
        image_index, expected_view = divmod(index, manifest.n_views)
        if (image_id, view_index) != (manifest.image_ids[image_index], expected_view):
            raise StoreError(f"{where} is image {image_id} view {view_index}, the manifest says image "
                             f"{manifest.image_ids[image_index]} view {expected_view}: re-extract the shard")
        parts: dict[int, dict[str, np.ndarray]] = {stride: {} for stride in manifest.strides}
        extras = {}
        for suffix, data in members.items():
            match = _PART.match(suffix)
            if match is None:
                extras[suffix] = data
                continue
            stride = int(match.group(1))
            if stride not in parts:
                raise StoreError(f"{where}: member {suffix!r} has a stride not in the manifest; re-extract it")
            level = next(level for level in manifest.levels if level.stride == stride)
            limit = level.channels * level.max_height * level.max_width * 8 + _NPY_HEADER_LIMIT
            try:
                if match.group(3):
                    declared = _zstd_frame_size(data)
                    if declared is None or declared > limit:
                        raise ValueError(f"zstd frame declares {declared} bytes, at most {limit} allowed")
                    # Decoded straight into a writable buffer of the declared size (the arrays become
                    # tensors as they are); a frame whose content differs from its declared size fails.
                    data = _ZSTD.decode(data, out=bytearray(declared))
                parts[stride][match.group(2)] = _load_npy(data, limit)
            except (ValueError, RuntimeError, OSError, EOFError, TypeError, SyntaxError) as error:
                raise StoreError(f"{where}: member {suffix!r} is not a plain numeric .npy ({error}); "
                                 "re-extract the shard") from None
        features, statistics = {}, {}
        for stride in manifest.strides:
            if stride not in feature_hw:
                raise StoreError(f"{where}: meta.json lacks stride {stride}; re-extract the shard")
            features[stride], sums = self._decode_level(stride, parts[stride], feature_hw[stride], where)
            if sums:
                statistics[stride] = sums
        return Sample(index=index, image_id=image_id, view_index=view_index, image_hw=image_hw,
                      features=features, extras=extras, statistics=statistics)

    def bytes_on_disk(self) -> dict:
        """Per level: bytes its members take in the tars (512-byte header plus padded data); total: all files."""
        levels = dict.fromkeys(self.manifest.strides, 0)
        for k in range(self.manifest.n_shards):
            with _open_tar(self.location, shard_name(k), "r:") as tar:
                for member in self._members_of(self.location.url(shard_name(k)), tar):
                    match = _PART.match(member.name.split(".", 1)[1])
                    if match and int(match.group(1)) in levels:
                        padded = -(-member.size // _TAR_BLOCK) * _TAR_BLOCK
                        levels[int(match.group(1))] += _TAR_BLOCK + padded
        return {"levels": levels, "total": self.location.tree_bytes()}
