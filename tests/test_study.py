"""The accuracy study's aggregation (study.aggregate), its per-image online control (engine.teacher_maps) and
its data option (synth's min_object_side)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pkd_offline.engine import Distillation, batch_padded_hw, teacher_maps
from pkd_offline.errors import PkdError
from pkd_offline.models import build_detector
from pkd_offline.pyramid import pad_teacher_maps, valid_masks
from stages.synth import SynthConfig, synth
from study.aggregate import codec_decision, compare, paired, paired_by_teacher, study_report, summarise


def test_summarise_uses_the_sample_standard_deviation():
    arm = summarise([0.30, 0.32, 0.34])
    assert arm["mAP"] == [0.30, 0.32, 0.34]
    assert arm["mean"] == pytest.approx(0.32)
    assert arm["std"] == pytest.approx(0.02)  # n - 1: the population std would be 0.0163
    assert summarise([0.5])["std"] == 0.0


def test_study_report_has_the_issue_schema_and_resolves_only_separated_arms():
    per_arm = {"baseline": [0.250, 0.256, 0.244], "offline_index": [0.320, 0.326, 0.314],
               "online_index": [0.318, 0.330, 0.309]}
    report = study_report(per_arm, pairs=[("offline_index", "baseline"), ("offline_index", "online_index")])
    json.dumps(report, allow_nan=False)  # valid JSON: no inf or nan anywhere
    assert set(report["arms"]) == set(per_arm)
    for name, arm in report["arms"].items():
        assert set(arm) == {"mAP", "mean", "std"} and arm["mAP"] == per_arm[name]
    gain = report["gain"]["offline_index"]
    assert gain["diff"] == pytest.approx(0.07) and gain["gain_in_std"] == pytest.approx(0.07 / 0.006)
    assert report["comparisons"]["offline_index vs baseline"]["significant"] is True
    assert report["comparisons"]["offline_index vs online_index"]["significant"] is False


def test_compare_matches_a_hand_computed_welch_t():
    a, b = summarise([1.0, 2.0, 3.0]), summarise([2.0, 4.0, 6.0])
    result = compare(b, a)
    se = math.sqrt(1.0 / 3 + 4.0 / 3)
    assert result["diff"] == pytest.approx(2.0) and result["se"] == pytest.approx(se)
    assert result["t"] == pytest.approx(2.0 / se)
    assert result["dof"] == pytest.approx((5 / 3) ** 2 / ((1 / 3) ** 2 / 2 + (4 / 3) ** 2 / 2))
    assert result["significant"] is False  # t 1.55; dof 2.94 rounds down to 2, whose 95% quantile is 4.30


@pytest.fixture(scope="module")
def ragged_batch():
    """A seeded random tiny teacher and two images whose padded sizes differ (96x128 and 128x64 px)."""
    torch.manual_seed(0)
    teacher = build_detector("fasterrcnn", num_classes=3, variant="tiny", backbone="resnet18").eval()
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 90, 128, generator=generator), torch.rand(3, 128, 60, generator=generator)]
    batch = [{"image": image, "image_hw": tuple(image.shape[-2:])} for image in images]
    return teacher, images, batch


def test_per_image_online_maps_equal_offline_maps_on_a_ragged_batch(ragged_batch):
    teacher, images, batch = ragged_batch
    pairs = [(8, 4), (16, 8)]
    padded_hw = batch_padded_hw(batch, 32)
    # The offline path: each image's maps at its own padded size (as extraction stores them), padded to the batch.
    with torch.no_grad():
        stored = [{t: teacher.features([image])[0][t][0] for _, t in pairs} for image in images]
    offline = teacher_maps([{**item, "teacher_features": maps} for item, maps in zip(batch, stored)], images,
                           Distillation(pairs, 6.0), padded_hw, torch.device("cpu"))
    per_image = teacher_maps(batch, images, Distillation(pairs, 6.0, teacher, per_image=True), padded_hw,
                             torch.device("cpu"))
    batched = teacher_maps(batch, images, Distillation(pairs, 6.0, teacher), padded_hw, torch.device("cpu"))
    reference = pad_teacher_maps(stored, padded_hw)
    valid = valid_masks([item["image_hw"] for item in batch], padded_hw, [t for _, t in pairs])
    for _, t in pairs:
        assert per_image[t].shape == batched[t].shape == reference[t].shape
        torch.testing.assert_close(per_image[t], offline[t], rtol=0, atol=1e-5)
        torch.testing.assert_close(per_image[t], reference[t], rtol=0, atol=1e-5)
        # The batched online forward differs inside the valid region too (it sees the other image's padding).
        inside = valid[t][:, None].expand_as(batched[t])
        assert (batched[t] - per_image[t])[inside].abs().max() > 1e-3


def test_study_model_options_survive_a_checkpoint_and_are_refused_where_they_do_not_apply():
    from pkd_offline.checkpoint import detector_from_checkpoint
    from pkd_offline.errors import PkdError

    torch.manual_seed(0)
    model = build_detector("retinanet", num_classes=3, variant="tiny", backbone="resnet18", anchor_scale=1.5,
                           head_norm="gn")
    rebuilt = detector_from_checkpoint({"spec": model.spec, "model": model.state_dict()}, "in-memory")
    sizes = rebuilt.detector.anchor_generator.sizes
    assert sizes[0] == (12, 15, 19) and sizes[-1] == (192, 241, 304)  # 1.5 x stride 8 .. 128, three octaves
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in rebuilt.detector.head.modules()) == 8
    assert build_detector("retinanet", num_classes=3, variant="tiny", backbone="resnet18").detector \
        .anchor_generator.sizes[0] == (16, 20, 25)  # the tiny default stays 2 x stride
    with pytest.raises(PkdError, match="applies to retinanet"):
        build_detector("fasterrcnn", num_classes=3, variant="tiny", anchor_scale=1.0)


def _long_sides(root, split="train") -> list[float]:
    coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
    return [max(a["bbox"][2:]) for a in coco["annotations"] if not a["iscrowd"]]


def test_min_object_side_drops_the_small_objects_and_only_them(tmp_path):
    default = _long_sides(synth(SynthConfig(tmp_path / "default", train=24, val=0, image_size=96, seed=3)))
    easier = _long_sides(synth(SynthConfig(tmp_path / "easier", train=24, val=0, image_size=96, seed=3,
                                           min_object_side=24.0)))
    assert min(default) < 12  # the default set has objects from 6 px
    assert len(easier) > 40 and min(easier) >= 24 - 0.02  # bbox rounding: 2 decimals
    with pytest.raises(PkdError, match="min_object_side"):
        synth(SynthConfig(tmp_path / "bad", train=2, val=0, image_size=96, min_object_side=60.0))


def test_paired_differences_match_a_hand_computed_t_interval():
    a, b = {0: 0.630, 1: 0.620, 2: 0.625, 7: 0.5}, {0: 0.631, 1: 0.630, 2: 0.629}
    test = paired(a, b)
    diffs = [-0.001, -0.010, -0.004]  # seed 7 has no partner: left out
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert test["seeds"] == [0, 1, 2] and test["diffs"] == pytest.approx(diffs)
    assert test["mean"] == pytest.approx(mean) and test["sd"] == pytest.approx(sd)
    assert test["ci95"] == pytest.approx([mean - 4.303 * sd / math.sqrt(3), mean + 4.303 * sd / math.sqrt(3)])
    assert test["significant"] is False  # the interval reaches 0
    assert paired({0: 0.6, 1: 0.61, 2: 0.62}, {0: 0.59, 1: 0.599, 2: 0.611})["significant"] is True
    assert paired({0: 0.6}, {0: 0.5, 1: 0.4}) is None


def test_the_codec_decision_takes_the_smallest_store_that_the_rule_passes():
    """gain 0.05, margin 0.2: a candidate passes when its paired interval reaches 0 and stays above -0.01."""
    seeds = range(4)
    fp32 = {s: 0.630 + 0.004 * (s % 2) for s in seeds}
    by_seed = {"fp32": fp32, "base": {s: 0.580 + 0.004 * (s % 2) for s in seeds},
               "worse": {s: fp32[s] - 0.007 + 0.0005 * s for s in seeds},  # significantly below fp32
               "same": {s: fp32[s] + 0.001 * (-1) ** s for s in seeds},  # no difference, tight
               "noisy": {s: fp32[s] + 0.02 * (-1) ** s for s in seeds}}  # no difference, too wide to decide
    points = {name: {"codec": name, "bits_per_value": bits} for name, bits in
              [("fp32", 32.0), ("worse", 5.0), ("same", 6.0), ("noisy", 2.0)]}
    rule = {"reference": "fp32", "baseline": "base", "margin": 0.2, "candidates": ["worse", "same", "noisy"]}
    decision = codec_decision(by_seed, points, rule)
    assert decision["arm"] == "same" and decision["codec"] == "same" and decision["bits_per_value"] == 6.0
    assert decision["gain"] == pytest.approx(0.05) and decision["margin"] == 0.2
    assert decision["paired_diff_ci95"] == decision["candidates"]["same"]["paired"]["ci95"]
    rows = decision["candidates"]
    assert [rows[name]["passes"] for name in ("worse", "same", "noisy")] == [False, True, False]
    assert rows["noisy"]["seeds_needed"] > 4 and rows["worse"]["seeds_needed"] is None
    only_fp32 = codec_decision(by_seed, points, {**rule, "candidates": ["worse", "noisy"]})
    assert only_fp32["arm"] == "fp32" and only_fp32["paired_diff_ci95"] == [0.0, 0.0]


def test_paired_by_teacher_splits_the_seeds_by_the_teacher_they_learnt_from():
    """Seeds 0-2 (teacher "t1") 0.007 below the reference, seeds 3-6 ("t2") level with it: each teacher's own paired
    test, and Welch's test between the two teachers' differences."""
    ref = {s: 0.63 + 0.003 * (s % 3) for s in range(7)}
    arm = {s: ref[s] + (-0.007 + 0.0005 * s if s < 3 else 0.001 * (-1) ** s) for s in range(7)}
    teacher_of = {s: "t1" if s < 3 else "t2" for s in range(7)}
    split = paired_by_teacher(arm, ref, teacher_of)
    assert set(split["per_teacher"]) == {"t1", "t2"}
    assert split["per_teacher"]["t1"]["seeds"] == [0, 1, 2] and split["per_teacher"]["t2"]["seeds"] == [3, 4, 5, 6]
    assert split["per_teacher"]["t1"]["significant"] and not split["per_teacher"]["t2"]["significant"]
    assert split["per_teacher"]["t1"]["mean"] == pytest.approx(-0.0065)
    assert split["between"]["diff"] == pytest.approx(-0.0065) and split["between"]["significant"]
    assert paired_by_teacher(arm, ref, {s: "t1" for s in range(7)}) is None  # one teacher: nothing to split
    one_seed_t2 = paired_by_teacher(arm, {s: ref[s] for s in range(4)}, teacher_of)
    assert one_seed_t2["per_teacher"]["t2"] is None and one_seed_t2["between"] is None
    points = {"ref": {"codec": "fp32", "bits_per_value": 32.0}, "arm": {"codec": "pca", "bits_per_value": 5.0}}
    rule = {"reference": "ref", "baseline": "base", "margin": 0.2, "candidates": ["arm"]}
    by_seed = {"ref": ref, "arm": arm, "base": {s: 0.58 for s in range(7)}}
    assert codec_decision(by_seed, points, rule, teacher_of)["candidates"]["arm"]["by_teacher"] == split
    assert codec_decision(by_seed, points, rule)["candidates"]["arm"]["by_teacher"] is None


def test_coco_params_follow_the_studys_codec_decision():
    import yaml

    decision = json.loads(open("metrics/study.json").read())["codec_decision"]
    extract = yaml.safe_load(open("params-coco.yaml"))["extract_index"]
    assert extract["codec"] == decision["codec"]
    assert extract.get("pca_step") == decision["pca_step"]
    from benchmarks.pairs import PAIRS

    assert (PAIRS["paper"].codec, PAIRS["paper"].pca_step) == (decision["codec"], decision["pca_step"])  # the
    # benchmarks measure the recipe's store
