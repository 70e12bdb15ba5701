"""--image-decode device: the workers hand on JPEG bytes, the step decodes them on its device and replays the
views there; on the CPU the items are the workers' own, through a DataLoader worker too, and a bad file stops
with a line naming it."""

import json
import shutil

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pkd_offline.data import CocoDetection, ViewSampler, collate
from pkd_offline.device_images import decode_on
from pkd_offline.errors import PkdError
from pkd_offline.views import make_views
from stages.train import TrainConfig

VIEWS = make_views(4, 96, 128)  # plain, flipped, and two other scales


def same_items(left: dict, right: dict, image_tolerance: float = 0.0) -> None:
    assert sorted(left) == sorted(right)
    for key in left:
        if key == "target":
            assert sorted(left[key]) == sorted(right[key])
            for name, value in left[key].items():
                assert torch.equal(value, right[key][name]), name
        elif key == "image":
            torch.testing.assert_close(left[key], right[key], rtol=0, atol=image_tolerance)
        elif isinstance(left[key], torch.Tensor):
            assert torch.equal(left[key], right[key]), key
        else:
            assert left[key] == right[key], key


@pytest.mark.parametrize("with_masks", [False, True])
def test_items_decoded_in_the_step_are_the_workers_items(synth_data, with_masks):
    workers = CocoDetection(synth_data, "train", VIEWS, with_masks=with_masks)
    device = CocoDetection(synth_data, "train", VIEWS, with_masks=with_masks, image_decode="device")
    keys = [(i, v) for i in range(3) for v in range(len(VIEWS))]
    handed_on = [device[key] for key in keys]
    assert all("image" not in item and item["jpeg"].dtype == torch.uint8 for item in handed_on)
    for key, item in zip(keys, decode_on(handed_on, torch.device("cpu"))):
        same_items(workers[key], item)


def test_a_batch_through_a_worker_decodes_as_the_workers_batch(synth_data):
    def first_batch(image_decode: str) -> list[dict]:
        dataset = CocoDetection(synth_data, "train", VIEWS, image_decode=image_decode)
        loader = DataLoader(dataset, batch_size=3, sampler=ViewSampler(len(dataset), len(VIEWS), seed=0),
                            collate_fn=collate, num_workers=1)
        return next(iter(loader))

    # a worker's bilinear resize may round differently from this process's (its own thread count): 1e-6 of 0..1
    for left, right in zip(first_batch("workers"), decode_on(first_batch("device"), torch.device("cpu"))):
        same_items(left, right, image_tolerance=1e-6)


def copy_of(synth_data, tmp_path):
    shutil.copytree(synth_data, tmp_path / "data")
    return tmp_path / "data"


def test_a_file_that_does_not_decode_is_named(synth_data, tmp_path):
    data = copy_of(synth_data, tmp_path)
    dataset = CocoDetection(data, "train", VIEWS, image_decode="device")
    path = dataset.image_file(dataset.image_ids[1])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])  # the header survives, the scan does not
    batch = [dataset[(i, 0)] for i in range(3)]
    with pytest.raises(PkdError, match=f"image {dataset.image_ids[1]} does not decode on cpu .*truncated"):
        decode_on(batch, torch.device("cpu"))


def test_a_file_that_is_not_jpeg_is_refused_in_the_worker(synth_data, tmp_path):
    data = copy_of(synth_data, tmp_path)
    dataset = CocoDetection(data, "train", VIEWS, image_decode="device")
    path = dataset.image_file(dataset.image_ids[0])
    with Image.open(path) as image:
        image.save(path, format="PNG")  # its name still says .jpg
    with pytest.raises(PkdError, match="is PNG, not JPEG: .*--image-decode workers"):
        dataset[(0, 0)]
    assert CocoDetection(data, "train", VIEWS)[(0, 0)]["image"].shape[0] == 3, "the workers still read it"


def test_device_decode_needs_the_data_directory():
    with pytest.raises(PkdError, match="--image-decode device reads JPEG files from --data"):
        TrainConfig(data=None, features="store.zarr", image_decode="device").validate()
    with pytest.raises(PkdError, match="image decode"):
        TrainConfig(image_decode="gpu").validate()


def test_offline_training_with_images_decoded_in_the_step_makes_the_workers_run(synth_data, tmp_path):
    """Two offline steps from one store: the same losses (up to a worker's resize rounding) whichever side
    decodes the images."""
    from stages.extract import ExtractConfig, extract
    from stages.train import train

    store = extract(ExtractConfig(teacher="swin", random_init=True, variant="tiny", data=synth_data,
                                  out=tmp_path / "f.zarr", codec="fp16", short_side=96, max_size=128,
                                  progress=False))
    losses = {}
    for image_decode in ("workers", "device"):
        cfg = TrainConfig(student="retinanet", backbone="resnet18", variant="tiny", data=synth_data,
                          out=tmp_path / image_decode, iters=2, batch_size=2, workers=1, features=store,
                          level_map="index", image_decode=image_decode, progress=False)
        train(cfg)
        log = (cfg.out / "log.jsonl").read_text().splitlines()
        losses[image_decode] = [json.loads(line)["loss"] for line in log]
    assert losses["device"] == pytest.approx(losses["workers"], rel=1e-4)
