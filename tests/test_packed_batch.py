import dataclasses
import pickle
from collections import defaultdict, namedtuple
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
import torch.multiprocessing  # noqa: F401  (registers the tensor reducers with ForkingPickler)
from torch.utils.data import DataLoader, Dataset

from pkd_offline.data import collate
from pkd_offline.device_codecs import EncodedMap
from pkd_offline.packed_batch import PackedBatch, pack_batch
from storage.pca_basis import LevelBasis

Pair = namedtuple("Pair", "first second")


def make_item(index: int, basis: LevelBasis) -> dict:
    """A data item shaped like a store-joined one: an image, a target, float maps, an encoded map, a pca basis
    of numpy arrays, a named tuple, a zero-size tensor and plain values (seeded per index)."""
    generator = torch.Generator().manual_seed(index)
    return {
        "image": torch.rand(3, 5 + index, 7, generator=generator),
        "target": {"boxes": torch.rand(index, 4, generator=generator), "labels": torch.arange(index),
                   "image_id": torch.tensor(100 + index)},
        "teacher_features": {4: torch.randn(6, 4, 4, generator=generator),
                             8: torch.randn(6, 2, 2, generator=generator)[:, :, :1]},  # not contiguous
        "teacher_sums": {4: (torch.randn(6, dtype=torch.float64, generator=generator),
                             torch.randn(6, dtype=torch.float64, generator=generator)),
                         8: Pair(torch.randn(2, dtype=torch.float64, generator=generator),
                                 torch.randn(2, dtype=torch.float64, generator=generator))},
        "encoded": EncodedMap("int8", {"values": torch.randint(-128, 127, (6, 3, 3), dtype=torch.int8,
                                                               generator=generator),
                                       "scale": torch.rand(6, generator=generator)}, basis),
        "empty": torch.zeros(0, 4),
        "image_id": 100 + index, "image_hw": (5 + index, 7), "name": f"item {index}",
    }


def assert_same(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, EncodedMap):
        assert a.codec == b.codec and a.basis is not None and b.basis is not None
        assert_same(a.parts, b.parts)
        np.testing.assert_array_equal(a.basis.components, b.basis.components)
    else:
        assert a == b


def tensors_of(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for inner in value.values() for t in tensors_of(inner)]
    if isinstance(value, (list, tuple)):
        return [t for inner in value for t in tensors_of(inner)]
    if isinstance(value, EncodedMap):
        return tensors_of(value.parts)
    return []


@pytest.fixture
def basis() -> LevelBasis:
    rng = np.random.default_rng(0)
    return LevelBasis(rng.random(6, np.float32), rng.random(6, np.float32), rng.random((6, 6), np.float32), 0.1)


def test_a_packed_batch_pickles_to_the_same_items_with_one_storage_per_dtype(basis):
    items = [make_item(i, basis) for i in range(3)]
    packed = pack_batch(items, shared=False)
    assert sorted(map(str, packed.flat)) == ["torch.float32", "torch.float64", "torch.int64", "torch.int8"]
    received = pickle.loads(pickle.dumps(packed))
    assert type(received) is list
    assert_same(received, items)
    storages = {t.untyped_storage().data_ptr() for t in tensors_of(received) if t.numel()}
    assert len(storages) == 4, "every tensor of a dtype must be a view of that dtype's one flat tensor"
    # The basis (numpy, one object for every sample) is not rebuilt per sample: pickle sends it once.
    assert received[0]["encoded"].basis is received[2]["encoded"].basis
    # Views: writing one item's tensor must not touch another's values.
    received[0]["image"].zero_()
    assert_same(received[1]["image"], items[1]["image"])


def test_a_shared_packed_batch_crosses_the_forking_pickler_as_shared_memory(basis):
    items = [make_item(i, basis) for i in range(2)]
    packed = pack_batch(items)
    assert all(flat.is_shared() for flat in packed.flat.values())
    received = ForkingPickler.loads(ForkingPickler.dumps(packed))
    assert_same(received, items)


class StoreLikeItems(Dataset):
    def __init__(self, basis: LevelBasis) -> None:
        self.basis = basis

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict:
        return make_item(index, self.basis)


def test_a_dataloader_with_workers_gives_the_items_of_one_without_them(basis):
    dataset = StoreLikeItems(basis)
    plain = list(DataLoader(dataset, batch_size=3, collate_fn=collate, num_workers=0))
    assert all(type(batch) is list for batch in plain), "in the main process collate keeps the list as it is"
    workers = list(DataLoader(dataset, batch_size=3, collate_fn=collate, num_workers=2))
    assert [len(b) for b in workers] == [3, 3, 2]
    assert_same(workers, plain)
    for batch in workers:  # packed in the worker: a batch is one segment per dtype, not one per tensor
        assert len({t.untyped_storage().data_ptr() for t in tensors_of(batch) if t.numel()}) == 4
    assert isinstance(pack_batch([]), PackedBatch) and pickle.loads(pickle.dumps(pack_batch([]))) == []


class MarkedTensor(torch.Tensor):
    """A tensor subclass: packing would turn it into a plain tensor, so it must travel as it is."""


@dataclasses.dataclass(frozen=True)
class Checked:
    """A frozen dataclass whose __post_init__ refuses anything but a tensor and derives a field from it."""

    values: torch.Tensor
    count: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.values, torch.Tensor):
            raise TypeError("values must be a tensor")
        object.__setattr__(self, "count", self.values.numel())


def test_what_packing_would_change_travels_as_it_is():
    generator = torch.Generator().manual_seed(5)
    grad = torch.rand(3, generator=generator).requires_grad_()
    marked = torch.rand(2, 2, generator=generator).as_subclass(MarkedTensor)
    counts = defaultdict(list, {"a": torch.arange(3)})
    items = [{"grad": grad, "marked": marked, "counts": counts, "plain": torch.rand(4, generator=generator),
              "ids": torch.arange(2), "checked": Checked(torch.arange(5))}]
    received = pickle.loads(pickle.dumps(pack_batch(items, shared=False)))[0]
    assert received["grad"].requires_grad and torch.equal(received["grad"].detach(), grad.detach())
    assert type(received["marked"]) is MarkedTensor and torch.equal(received["marked"], marked)
    assert type(received["counts"]) is defaultdict and received["counts"].default_factory is list
    assert torch.equal(received["counts"]["a"], counts["a"])
    assert type(received["plain"]) is torch.Tensor and torch.equal(received["plain"], items[0]["plain"])
    # A dataclass is rebuilt around the views without __init__ (which would have seen placeholders when packing).
    assert type(received["checked"]) is Checked and received["checked"].count == 5
    assert torch.equal(received["checked"].values, torch.arange(5))
    storage = received["checked"].values.untyped_storage().data_ptr()
    assert storage == received["ids"].untyped_storage().data_ptr(), "the dataclass's tensor must have been packed"
