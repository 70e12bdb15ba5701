"""Whether a store fits a run is a check that changes nothing; leaving out the images a store skipped is its own step."""

import shutil

import pytest

from pkd_offline.data import CocoDetection
from pkd_offline.models import build_detector
from pkd_offline.store_data import store_views
from pkd_offline.store_fit import check_store_fits, drop_images_the_store_skipped
from stages.extract import ExtractConfig, extract
from stages.train import TrainConfig, train
from storage import open_store


@pytest.fixture(scope="module")
def skipping_store(synth_data, tmp_path_factory):
    """A data directory whose third train image is corrupt, and a one-view store extracted with it skipped."""
    root = tmp_path_factory.mktemp("skipping")
    data = root / "data"
    shutil.copytree(synth_data, data)
    dataset = CocoDetection(data, "train", [])
    dataset.image_file(dataset.image_ids[2]).write_bytes(b"\xff\xd8 not really a jpeg")
    store = extract(ExtractConfig(teacher="swin", random_init=True, variant="tiny", data=data, out=root / "f.zarr",
                                  views=1, short_side=128, max_size=128, batch_size=4, workers=0, samples_per_shard=4,
                                  on_error="skip", progress=False))
    return data, store, dataset.image_ids[2]


def test_the_fit_check_leaves_the_data_set_alone_and_the_drop_step_leaves_out_the_skipped(skipping_store):
    data, store, bad_id = skipping_store
    dataset = CocoDetection(data, "train", store_views(store))
    all_ids = list(dataset.image_ids)
    student = build_detector("retinanet", num_classes=dataset.num_classes, variant="tiny", backbone="resnet18")
    reader = check_store_fits(store, dataset, student)
    assert dataset.image_ids == all_ids and len(all_ids) == 8
    drop_images_the_store_skipped(dataset, reader.manifest)
    assert dataset.image_ids == [i for i in all_ids if i != bad_id] == open_store(str(store)).manifest.image_ids


def test_training_against_a_store_that_skipped_an_image_trains_on_the_rest(skipping_store, tmp_path):
    data, store, _ = skipping_store
    path = train(TrainConfig(student="retinanet", backbone="resnet18", variant="tiny", data=data, features=store,
                             out=tmp_path / "run", iters=1, batch_size=8, workers=0, short_side=128, max_size=128,
                             optimizer="adamw", lr=1e-3, warmup_iters=1, val_split=None, progress=False))
    assert path.name == "model.pt" and path.exists()
