"""COCO-format detection data on pycocotools, replayed through recorded views.

Layout (the COCO 2017 one): ``ROOT/annotations/instances_{split}.json`` and images under
``ROOT/{split}/``. COCO category ids (which have gaps) map to contiguous labels 1..K (0 is
background for the R-CNN heads) and back with :attr:`CocoDetection.category_ids`.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler, get_worker_info

from pkd_offline.errors import PkdError
from pkd_offline.packed_batch import PackedBatch, pack_batch
from pkd_offline.views import View, apply_view, resized_size, view_target
from storage.files import sha256_local_file


def annotation_path(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a local file's bytes (annotation files, checkpoints): the stores' own hasher."""
    return sha256_local_file(str(path))


def load_coco(path: Path):
    """Load a COCO annotation file with pycocotools; a clear PkdError if it is missing or not COCO."""
    from pycocotools.coco import COCO

    path = Path(path)
    if not path.is_file():
        raise PkdError(f"annotation file {path} not found: pass --data DIR holding annotations/instances_SPLIT.json")
    try:
        with open(path) as handle:
            content = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PkdError(f"{path} is not a COCO annotation file (not JSON: {error})") from None
    if not isinstance(content, dict) or not all(isinstance(content.get(k), list) for k in ("images", "annotations", "categories")):
        raise PkdError(f"{path} is not a COCO annotation file: it needs 'images', 'annotations' and 'categories' lists")
    coco = COCO()
    coco.dataset = content
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    except (KeyError, TypeError) as error:
        raise PkdError(f"{path} is not a COCO annotation file (missing field {error})") from None
    return coco


def _rgb_tensor(source) -> Tensor:
    """Decode an image file (a path or a binary file object) to a (3, H, W) uint8 RGB tensor."""
    with Image.open(source) as image:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


IMAGE_DECODES = ("workers", "device")  # where training decodes its JPEGs (``TrainConfig.image_decode``)


@contextlib.contextmanager
def image_file_errors(path: Path):
    """Reading the image file ``path`` inside: a missing or corrupt file becomes one PkdError naming it."""
    try:
        yield
    except FileNotFoundError:
        raise PkdError(f"image {path} not found: check --data and the annotation file's file_name") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise PkdError(f"image {path} is corrupt ({error}): replace it or remove it from the annotation file") from None


def read_image(path: Path) -> Tensor:
    """Decode an image file to a (3, H, W) uint8 tensor; PkdError naming the file if missing or corrupt."""
    with image_file_errors(path):
        return _rgb_tensor(path)


def read_jpeg_bytes(path: Path) -> tuple[Tensor, tuple[int, int]]:
    """A JPEG file's bytes as a uint8 (B,) tensor and its (h, w) px from the header alone (nothing decoded);
    PkdError naming the file if it is missing, unreadable or not a JPEG (a device decodes JPEG only)."""
    with image_file_errors(path):
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            kind, (width, height) = image.format, image.size
    if kind != "JPEG":
        raise PkdError(f"image {path} is {kind}, not JPEG: --image-decode device decodes JPEG only; train with "
                       "--image-decode workers")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), (height, width)


def decode_image(data: bytes, where: str) -> Tensor:
    """Decode an image file's bytes (as a store holds them) to a (3, H, W) uint8 tensor, as :func:`read_image`
    decodes the file; PkdError naming ``where`` if they are not an image."""
    try:
        return _rgb_tensor(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError) as error:
        raise PkdError(f"{where} is not a readable image ({error}): re-extract the store") from None


class CocoDetection(Dataset):
    """Items are ``dataset[(image_index, view_index)]`` (see :class:`ViewSampler`).

    An item is a dict: ``image`` (3, h, w) float32 in 0..1 after the view, ``target`` (``boxes``
    (K, 4) float xyxy view pixels, ``labels`` (K,) int64 contiguous, ``masks`` (K, h, w) uint8 if
    ``with_masks``), ``image_id``, ``view_index``, ``image_hw`` (h, w) and ``original_hw`` (H, W).
    Crowd annotations and boxes under 1 px are left out; images without boxes are kept.

    With ``image_decode="device"`` an item carries ``jpeg`` (the file's bytes, uint8 (B,)) and its ``view`` in
    place of ``image``; the training step decodes the batch on its device (``pkd_offline.device_images``).
    """

    def __init__(self, root: Path, split: str, views: list[View], *, with_masks: bool = False,
                 image_decode: str = "workers") -> None:
        self.root = Path(root)
        self.split = split
        self.views = list(views)
        self.with_masks = with_masks
        self.image_decode = image_decode
        self.annotation_file = annotation_path(self.root, split)
        self.coco = load_coco(self.annotation_file)
        self.image_ids: list[int] = sorted(self.coco.imgs)
        self.category_ids: list[int] = sorted(self.coco.cats)
        self.label_of_category = {cat: i + 1 for i, cat in enumerate(self.category_ids)}

    @property
    def num_classes(self) -> int:
        """Number of classes including background (label 0)."""
        return len(self.category_ids) + 1

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_file(self, image_id: int) -> Path:
        return self.root / self.split / self.coco.imgs[image_id]["file_name"]

    def original_hw(self, image_id: int) -> tuple[int, int]:
        info = self.coco.imgs[image_id]
        return int(info["height"]), int(info["width"])

    def target(self, image_id: int) -> dict[str, Tensor]:
        """Boxes (K, 4) xyxy px, labels (K,), and masks (K, H, W) if asked, of non-crowd annotations."""
        annotations = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        annotations = [a for a in annotations if a["bbox"][2] >= 1 and a["bbox"][3] >= 1]
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        labels = torch.tensor([self.label_of_category[a["category_id"]] for a in annotations], dtype=torch.int64)
        target = {"boxes": boxes, "labels": labels}
        if self.with_masks:
            height, width = self.original_hw(image_id)
            masks = [self.coco.annToMask(a) for a in annotations]
            target["masks"] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.uint8)
        return target

    def __getitem__(self, key: tuple[int, int]) -> dict:
        image_index, view_index = key
        image_id = self.image_ids[image_index]
        view = self.views[view_index]
        if self.image_decode == "device":  # the file's bytes; the step decodes them (pkd_offline.device_images)
            data, hw = read_jpeg_bytes(self.image_file(image_id))
            self._check_size(image_id, hw)
            target = view_target(self.target(image_id), hw, view)
            image = {"jpeg": data, "view": view, "image_hw": resized_size(*hw, view)}
        else:
            decoded = read_image(self.image_file(image_id))
            self._check_size(image_id, tuple(decoded.shape[-2:]))
            view_image, target = apply_view(decoded, self.target(image_id), view)
            image = {"image": view_image, "image_hw": tuple(view_image.shape[-2:])}
        target["image_id"] = torch.tensor(image_id)
        return {
            **image,
            "target": target,
            "image_id": image_id,
            "image_index": image_index,
            "view_index": view_index,
            "original_hw": self.original_hw(image_id),
        }

    def _check_size(self, image_id: int, hw: tuple[int, int]) -> None:
        """PkdError unless the image file's (h, w) is the annotation file's."""
        if tuple(hw) != self.original_hw(image_id):
            raise PkdError(
                f"image {self.image_file(image_id)} is {hw[1]}x{hw[0]} px but the annotation "
                f"file says {self.original_hw(image_id)[1]}x{self.original_hw(image_id)[0]}: fix one of them"
            )


class ViewSampler(Sampler):
    """Yields (image_index, view_index) keys: every image once per epoch, one of its views each.

    The order and view choices depend only on (seed, epoch), so a resumed run replays them; with
    ``num_replicas`` > 1 each rank takes a disjoint stride of the order.
    """

    def __init__(self, num_images: int, num_views: int, *, seed: int = 0, shuffle: bool = True,
                 random_views: bool = True, rank: int = 0, num_replicas: int = 1) -> None:
        self.num_images, self.num_views = num_images, num_views
        self.seed, self.shuffle, self.random_views = seed, shuffle, random_views
        self.rank, self.num_replicas = rank, num_replicas
        self.epoch = 0
        self.skip = 0  # keys of this epoch already consumed (a resumed run starts after them)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def keys(self) -> list[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_images, generator=generator) if self.shuffle else torch.arange(self.num_images)
        if self.random_views:
            views = torch.randint(self.num_views, (self.num_images,), generator=generator)
        else:
            views = torch.zeros(self.num_images, dtype=torch.int64)
        keys = [(int(i), int(views[i])) for i in order]
        return keys[self.rank::self.num_replicas][self.skip:]

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return max(0, len(range(self.rank, self.num_images, self.num_replicas)) - self.skip)


def collate(items: list[dict]) -> list[dict] | PackedBatch:
    """Keep a batch as a list of items; detectors batch (normalise and pad) images themselves.

    In a DataLoader worker the batch is packed (``pkd_offline.packed_batch``): it reaches the main process
    as one shared-memory tensor per dtype and unpacks there to the same list of items, tensors as views."""
    if get_worker_info() is not None:
        return pack_batch(items)
    return items
