"""Fuzzing the store readers: random and mutated manifests, tar shards, zarr shard files and arrays.

Every case must end in a clean StoreError or a correct read: never a hang (each read runs under an
alarm), never another exception type, never a silently wrong feature value. Where a read succeeds on
mutated bytes, ``verify_shards`` must flag the shard. Hypothesis runs derandomized with a bounded
number of examples, so CI sees the same cases every time.
"""

import io
import json
import shutil
import signal
import tarfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numcodecs import Zstd

from storage import CODECS, Manifest, StoreError, open_store
from storage.testing import tiny_manifest, tiny_samples, write_store

settings.register_profile("readers", derandomize=True, max_examples=60, deadline=5000, database=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FUZZ = settings.get_profile("readers")
HANG_SECONDS = 10
OUTCOMES: Counter = Counter()  # "read" / "refused" per reader call, printed at the end (pytest -s)
pytestmark = pytest.mark.filterwarnings("ignore:.*does not have a Zarr V3 specification")


@pytest.fixture(scope="module", autouse=True)
def _report_outcomes():
    yield
    print(f"\nfuzz reader calls: {dict(OUTCOMES)}")


class Hang(BaseException):
    """Raised by the alarm; a BaseException so no reader's ``except OSError`` can swallow it."""


@contextmanager
def time_limit(seconds: int = HANG_SECONDS):
    def alarm(signum, frame):
        raise Hang(f"reader did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def attempt(read):
    """``read()``'s result, or None for a StoreError; any other exception fails the test."""
    with time_limit():
        try:
            value = read()
        except StoreError as error:
            message = str(error)
            assert message and "\n" not in message.strip(), f"StoreError is not one line: {message!r}"
            OUTCOMES["refused"] += 1
            return None
    OUTCOMES["read"] += 1
    return value


# --- manifests ---

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
VALID = json.loads(tiny_manifest(fmt="wds", samples_per_shard=3).to_json())


def check_manifest(text: str) -> None:
    manifest = attempt(lambda: Manifest.from_json(text))
    if manifest is None:
        return
    # Accepted: it must be internally consistent and survive a round trip.
    again = Manifest.from_json(manifest.to_json())
    assert again.to_json() == manifest.to_json()
    assert sum(len(manifest.shard_range(k)) for k in range(manifest.n_shards)) == manifest.n_samples
    assert all(0 <= record.index < manifest.n_shards for record in manifest.shards)


@settings(FUZZ)
@given(json_values)
def test_random_json_is_refused_or_a_valid_manifest(value):
    check_manifest(json.dumps(value))


def paths_of(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths_of(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from paths_of(child, prefix + (index,))


PATHS = [path for path in paths_of(VALID) if path]


@settings(FUZZ, max_examples=100)
@given(st.sampled_from(PATHS), st.sampled_from(["replace", "delete", "add"]), json_values)
def test_mutated_manifest_is_refused_or_valid(path, how, value):
    manifest = json.loads(json.dumps(VALID))
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if how == "replace":
        parent[key] = value
    elif how == "delete":
        del parent[key]
    elif isinstance(parent, dict):
        parent[f"{key}_extra"] = value
    else:
        parent.insert(key, value)
    check_manifest(json.dumps(manifest))


@settings(FUZZ)
@given(st.data())
def test_manifest_text_with_flipped_or_cut_bytes_is_refused_or_valid(data):
    raw = bytearray(json.dumps(VALID).encode())
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    check_manifest(raw.decode("utf-8", errors="replace"))


def test_pathological_manifest_texts():
    for text in ["[" * 100_000, '{"format_version": 1' + ', "a": [' * 50_000, "\ud800", "", "null", "1e999",
                 json.dumps({**VALID, "format_version": True}), json.dumps({**VALID, "samples_per_shard": 10**30})]:
        check_manifest(text)


def test_manifest_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "f"
    write_store(str(path), tiny_manifest(fmt="wds"), tiny_samples(tiny_manifest(fmt="wds")))
    (path / "manifest.json").write_bytes(b"\xff\xfe{" + b"\x00" * 10)
    with pytest.raises(StoreError, match="not UTF-8"):
        open_store(str(path))


# --- WebDataset shards ---

@pytest.fixture(scope="module")
def wds_store(tmp_path_factory) -> tuple[Path, list]:
    manifest = tiny_manifest(fmt="wds", codec="int8", samples_per_shard=3)
    samples = tiny_samples(manifest)
    path = tmp_path_factory.mktemp("fuzz") / "wds"
    write_store(str(path), manifest, samples)
    return path, samples


@pytest.fixture
def wds_copy(wds_store, tmp_path) -> tuple[Path, Path]:
    """(a working copy to damage, the pristine store); hypothesis reuses it across examples, so each example
    first restores the shard it damages from the pristine store."""
    pristine, _ = wds_store
    shutil.copytree(pristine, tmp_path / "wds")
    return tmp_path / "wds", pristine


def read_shard_everyway(path: Path, shard: int) -> dict[int, object]:
    """Every sample of ``shard`` by random access and by streaming; index -> Sample, or None if it was refused."""
    reader = attempt(lambda: open_store(str(path)))
    if reader is None:
        return {}
    results = {}
    for index in reader.manifest.shard_range(shard):
        results[index] = attempt(lambda: reader.read(index))
    streamed = attempt(lambda: list(open_store(str(path)).iter_samples([shard])))
    if streamed is not None:
        assert [s.index for s in streamed] == list(reader.manifest.shard_range(shard)), "streaming skipped a sample"
        for sample in streamed:
            results.setdefault(sample.index, sample)
    return results


def check_reads(path: Path, shard: int, original: bytes, mutated: bytes, clean_reads: dict) -> None:
    results = read_shard_everyway(path, shard)
    flagged = bool(attempt(lambda: open_store(str(path)).verify_shards()))
    if mutated == original:
        assert not flagged
    wrong = [index for index, sample in results.items() if sample is not None and not np.all(
        [np.array_equal(sample.features[s], clean_reads[index].features[s]) for s in clean_reads[index].features]
        + [sorted(sample.features) == sorted(clean_reads[index].features)])]
    assert not wrong, f"samples {wrong} read wrong feature values without an error"
    differs = [index for index, sample in results.items() if sample is not None and
               (sample.image_id, sample.view_index, sample.image_hw) != (clean_reads[index].image_id,
                                                                        clean_reads[index].view_index,
                                                                        clean_reads[index].image_hw)]
    if differs or any(sample is not None and sample.extras != clean_reads[i].extras for i, sample in results.items()):
        assert flagged, f"samples {differs} changed silently and verify did not flag the shard"
    if mutated != original:
        assert flagged, "changed shard bytes were not flagged by verify_shards"


def clean(path: Path, shard: int) -> dict:
    reader = open_store(str(path))
    return {index: reader.read(index) for index in reader.manifest.shard_range(shard)}


mutations = st.lists(st.tuples(st.sampled_from(["flip", "truncate", "overwrite", "zero"]), st.floats(0, 1),
                               st.integers(1, 255), st.binary(min_size=1, max_size=64)), min_size=1, max_size=3)


def mutate(raw: bytes, steps) -> bytes:
    content = bytearray(raw)
    for how, where, mask, junk in steps:
        if not content:
            break
        offset = min(int(where * len(content)), len(content) - 1)
        if how == "flip":
            content[offset] ^= mask
        elif how == "truncate":
            del content[offset:]
        elif how == "overwrite":
            content[offset: offset + len(junk)] = junk
        else:
            content[offset: offset + 512] = bytes(len(content[offset: offset + 512]))
    return bytes(content)


@settings(FUZZ, max_examples=100)
@given(mutations)
def test_wds_shard_with_mutated_bytes(wds_copy, steps):
    path, pristine = wds_copy
    tar = path / "shard-000001.tar"
    original = (pristine / tar.name).read_bytes()
    reference = clean(pristine, 1)
    mutated = mutate(original, steps)
    tar.write_bytes(mutated)
    check_reads(path, 1, original, mutated, reference)


def tar_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return [(info.name, archive.extractfile(info).read()) for info in archive.getmembers()]


def build_tar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


names = st.text(st.sampled_from("0123456789.sabcjnpyzkltdx_/-"), min_size=1, max_size=30)
member_edits = st.lists(st.one_of(
    st.tuples(st.just("rename"), st.integers(0, 100), names),
    st.tuples(st.just("drop"), st.integers(0, 100), st.none()),
    st.tuples(st.just("duplicate"), st.integers(0, 100), st.none()),
    st.tuples(st.just("swap"), st.integers(0, 100), st.integers(0, 100)),
    st.tuples(st.just("insert"), st.integers(0, 100), st.tuples(names, st.binary(max_size=64))),
    st.tuples(st.just("suffix"), st.integers(0, 100), st.sampled_from([".pyd", ".pickle", ".PKL", ".pt", ".npz", "x",
                                                                       ".zst", ".json"])),
    st.tuples(st.just("content"), st.integers(0, 100), st.binary(max_size=64)),
), min_size=1, max_size=3)


@settings(FUZZ, max_examples=100)
@given(member_edits)
def test_wds_shard_with_mutated_members(wds_copy, edits):
    path, pristine = wds_copy
    tar = path / "shard-000001.tar"
    original = (pristine / tar.name).read_bytes()
    reference = clean(pristine, 1)
    members = tar_members(original)
    for how, position, argument in edits:
        if not members:
            break
        i = position % len(members)
        if how == "rename":
            members[i] = (argument, members[i][1])
        elif how == "drop":
            del members[i]
        elif how == "duplicate":
            members.insert(i, members[i])
        elif how == "swap":
            j = argument % len(members)
            members[i], members[j] = members[j], members[i]
        elif how == "insert":
            members.insert(i, argument)
        elif how == "suffix":
            members[i] = (members[i][0] + argument, members[i][1])
        else:
            members[i] = (members[i][0], argument)
    mutated = build_tar(members)
    tar.write_bytes(mutated)
    check_reads(path, 1, original, mutated, reference)


dtypes = st.one_of(hnp.scalar_dtypes(), hnp.byte_string_dtypes(max_len=4), hnp.unicode_string_dtypes(max_len=4),
                   hnp.array_dtypes(max_size=2))
# The int8 layout of stride 8 of sample 0 in ``tiny_manifest``: q (C, h, w) int8, scale and offset (C,) float32.
PART_LAYOUT = {"q": (np.int8, (4, 8, 9)), "scale": (np.float32, (4,)), "offset": (np.float32, (4,))}


@st.composite
def part_arrays(draw):
    """(part, array): exactly the part's dtype and shape (the reader must accept and use them), the part's shape
    with any other dtype, the part's dtype with another shape, or any numeric, string or structured dtype
    and shape (0-4 dims)."""
    part = draw(st.sampled_from(sorted(PART_LAYOUT)))
    dtype, shape = PART_LAYOUT[part]
    kind = draw(st.sampled_from(["exact", "other dtype", "other shape", "anything"]))
    if kind == "exact":
        elements = st.integers(-128, 127) if dtype == np.int8 else st.floats(-1e3, 1e3, width=32)
        return part, draw(hnp.arrays(dtype, shape, elements=elements))
    if kind == "other dtype":
        return part, draw(hnp.arrays(dtypes.filter(lambda other: other != dtype), shape))
    if kind == "other shape":
        return part, draw(hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=4, max_side=9)
                                     .filter(lambda other: other != shape)))
    return part, draw(hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=4, max_side=9)))


@pytest.mark.filterwarnings("ignore:Stored array in format 3.0")  # np.save of a structured dtype with unicode names
def test_wds_part_holding_an_arbitrary_array(wds_copy):
    path, pristine = wds_copy
    tar = path / "shard-000000.tar"
    original = (pristine / tar.name).read_bytes()
    reference = clean(pristine, 0)
    assert reference[0].features[8].shape == PART_LAYOUT["q"][1]
    original_parts = {name.split(".")[2]: np.load(io.BytesIO(Zstd().decode(data)), allow_pickle=False)
                      for name, data in tar_members(original) if name.startswith("000000000.s8.")}
    assert sorted(original_parts) == sorted(PART_LAYOUT)
    branches = Counter()

    @settings(FUZZ, max_examples=80)
    @given(part_arrays(), st.booleans())
    def plant(part_array, compress):
        part, array = part_array
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        name = f"s8.{part}.npy" + (".zst" if compress else "")
        members = [(n, d) for n, d in tar_members(original) if n != f"000000000.s8.{part}.npy.zst"]
        planted = Zstd(level=1).encode(buffer.getvalue()) if compress else buffer.getvalue()
        members.insert(0, (f"000000000.{name}", planted))
        tar.write_bytes(build_tar(members))
        sample = attempt(lambda: open_store(str(path)).read(0))
        if sample is None:
            branches["refused"] += 1
        else:
            # Only an array of exactly the codec's dtype and shape may be accepted, and then its values are used.
            branches["accepted"] += 1
            dtype, shape = PART_LAYOUT[part]
            assert array.dtype == dtype and array.shape == shape, (array.dtype, array.shape)
            expected = CODECS["int8"].decode({**original_parts, part: array})
            assert np.array_equal(sample.features[8], expected, equal_nan=True), "the planted values were not used"
        assert attempt(lambda: open_store(str(path)).verify_shards()), "a replaced part was not flagged by verify"

    plant()
    print(f"\nwds part replaced by an array: {dict(branches)}")
    assert branches["accepted"] > 0 and branches["refused"] > 0, branches


# --- zarr shard files ---

@pytest.fixture(scope="module")
def zarr_store(tmp_path_factory) -> Path:
    manifest = tiny_manifest(fmt="zarr", codec="fp16", samples_per_shard=3)
    path = tmp_path_factory.mktemp("fuzz") / "f.zarr"
    write_store(str(path), manifest, tiny_samples(manifest))
    return path


@pytest.fixture
def zarr_copy(zarr_store, tmp_path) -> Path:
    """A working copy; hypothesis reuses it across examples, so each example restores what it damaged."""
    shutil.copytree(zarr_store, tmp_path / "f.zarr")
    return tmp_path / "f.zarr"


@contextmanager
def restored(path: Path):
    original = path.read_bytes()
    try:
        yield original
    finally:
        path.write_bytes(original)


@settings(FUZZ, max_examples=100)
@given(st.integers(0, 100), mutations)
def test_zarr_shard_file_with_mutated_bytes(zarr_store, zarr_copy, which, steps):
    reference = clean(zarr_store, 1)
    files = open_store(str(zarr_copy)).shard_paths(1)
    victim = Path(files[which % len(files)])
    with restored(victim) as original:
        mutated = mutate(original, steps)
        victim.write_bytes(mutated)
        check_reads(zarr_copy, 1, original, mutated, reference)


KEEP = object()  # "write the field back as it was (re-serialised)": a change the reader must accept


def test_zarr_array_metadata_mutated(zarr_store, zarr_copy):
    branches = Counter()
    reference = clean(zarr_store, 1)

    # Random JSON for a field is nearly always refused at open; the field written back as it was, or harmless
    # attributes, must open and read the original values: both branches run.
    @settings(FUZZ, max_examples=60)
    @given(st.sampled_from(["image_id", "feature_hw", "s8/values", "s16/values"]),
           st.sampled_from(["shape", "data_type", "chunk_grid", "codecs", "fill_value", "zarr_format", "node_type",
                            "chunk_key_encoding", "attributes", "dimension_names"]),
           st.one_of(json_values, st.just(KEEP), st.dictionaries(st.text(max_size=8), json_values, max_size=3)))
    def mutate_field(array, key, value):
        metadata_path = zarr_copy / array / "zarr.json"
        with restored(metadata_path):
            metadata = json.loads(metadata_path.read_text())
            metadata[key] = json.loads(json.dumps(metadata.get(key))) if value is KEEP else value
            metadata_path.write_text(json.dumps(metadata))
            reader = attempt(lambda: open_store(str(zarr_copy)))
            branches["refused at open" if reader is None else "opened"] += 1
            if reader is not None:
                for index in reader.manifest.shard_range(1):
                    sample = attempt(lambda: reader.read(index))
                    branches["refused at read" if sample is None else "read"] += 1
                    if sample is not None:
                        assert all(np.array_equal(sample.features[s], reference[index].features[s])
                                   for s in sample.features), f"{array} {key}={value!r} changed values silently"

    mutate_field()
    print(f"\nzarr array metadata mutated: {dict(branches)}")
    assert branches["refused at open"] > 0 and branches["opened"] > 0 and branches["read"] > 0, branches


@settings(FUZZ, max_examples=60)
@given(hnp.arrays(st.one_of(hnp.scalar_dtypes(), hnp.byte_string_dtypes(max_len=3), hnp.unicode_string_dtypes(max_len=3)),
                  hnp.array_shapes(min_dims=1, max_dims=4, max_side=4)))
def test_zarr_array_replaced_by_an_arbitrary_array(zarr_store, zarr_copy, array):
    import zarr

    group = zarr.open_group(str(zarr_copy), mode="r+")
    del group["s8/values"]
    try:
        try:
            group.create_array("s8/values", data=array)
        except Exception:
            return  # zarr cannot store it at all
        reader = attempt(lambda: open_store(str(zarr_copy)))
        assert reader is None, f"a {array.dtype} {array.shape} array was accepted in place of s8/values"
    finally:
        shutil.rmtree(zarr_copy / "s8" / "values", ignore_errors=True)
        shutil.copytree(zarr_store / "s8" / "values", zarr_copy / "s8" / "values")
