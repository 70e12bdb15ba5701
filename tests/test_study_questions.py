"""The paper's questions in the study's report (study.questions): the MSE weight chosen on one seed, PCC against MSE,
the loss weight and another student family, each paired by seed; and the driver's --questions report."""

from __future__ import annotations

import json

import pytest
import yaml

from study.questions import convergence_gaps, mse_sweep, question_arms, question_report
from study.run import main

QUESTIONS = {"pcc": "pkd", "baseline": "base",
             "mse_sweep": {"seed": 3, "arms": {0.1: "mse_small", 0.4: "mse_mid", 1.6: "mse_large"}},
             "loss_weight": {"reference": 6, "arms": {1: "pkd_a1", 6: "pkd", 12: "pkd_a12"}},
             "student_family": {"fcos": {"baseline": "fcos_base", "offline": "fcos_pkd"}}}


def _by_seed() -> dict[str, dict[int, float]]:
    return {"base": {3: 0.580, 4: 0.585, 5: 0.575}, "pkd": {0: 0.62, 3: 0.630, 4: 0.635, 5: 0.628},
            "mse_small": {3: 0.590}, "mse_mid": {3: 0.610, 4: 0.612, 5: 0.604}, "mse_large": {3: 0.600},
            "pkd_a1": {3: 0.600, 4: 0.607, 5: 0.598}, "pkd_a12": {3: 0.631},
            "fcos_base": {3: 0.50, 4: 0.51, 5: 0.49}, "fcos_pkd": {3: 0.54, 4: 0.56}}


def test_the_mse_weight_is_the_best_of_the_sweep_on_its_seed_and_waits_for_every_weight():
    by_seed = _by_seed()
    sweep = mse_sweep(by_seed, {0.1: "mse_small", 0.4: "mse_mid", 1.6: "mse_large"}, 3)
    assert sweep == {"seed": 3, "mAP": {0.1: 0.590, 0.4: 0.610, 1.6: 0.600}, "alpha": 0.4, "arm": "mse_mid"}
    assert mse_sweep({**by_seed, "mse_large": {4: 0.7}}, {0.1: "mse_small", 1.6: "mse_large"}, 3) is None
    tie = mse_sweep({"a": {3: 0.6}, "b": {3: 0.6}}, {2.0: "b", 1.0: "a"}, 3)
    assert tie["alpha"] == 1.0  # a tie goes to the smaller weight


def test_question_report_pairs_each_question_by_seed():
    report = question_report(_by_seed(), QUESTIONS)
    versus = report["pcc_vs_mse"]
    assert versus["mse"]["arm"] == "mse_mid" and versus["mse_alpha"] == 0.4
    assert versus["pcc_minus_mse"]["seeds"] == [3, 4, 5]  # pkd's seed 0 has no MSE partner
    assert versus["pcc_minus_mse"]["diffs"] == pytest.approx([0.020, 0.023, 0.024])
    assert versus["mse_minus_baseline"]["mean"] == pytest.approx((0.030 + 0.027 + 0.029) / 3)
    weights = report["loss_weight"]["weights"]
    assert list(weights) == ["1.0", "6.0", "12.0"] and report["loss_weight"]["reference"] == 6.0
    assert weights["6.0"]["minus_reference"] is None and weights["6.0"]["seeds"] == [0, 3, 4, 5]
    assert weights["1.0"]["minus_reference"]["diffs"] == pytest.approx([-0.030, -0.028, -0.030])
    assert weights["12.0"]["minus_reference"] is None  # one common seed: no paired test yet
    fcos = report["student_family"]["fcos"]
    assert fcos["offline"]["mAP"] == [0.54, 0.56]
    assert fcos["offline_minus_baseline"]["diffs"] == pytest.approx([0.04, 0.05])


def test_question_parts_whose_runs_have_not_finished_are_none():
    report = question_report({"pkd": {3: 0.63}, "base": {3: 0.58}}, QUESTIONS)
    assert report["mse_sweep"] is None and report["pcc_vs_mse"] is None and report["student_family"] == {}
    assert list(report["loss_weight"]["weights"]) == ["6.0"]
    assert question_arms(QUESTIONS) == ["mse_small", "mse_mid", "mse_large", "pkd", "base", "pkd_a1", "pkd_a12",
                                        "fcos_base", "fcos_pkd"]


def test_report_only_with_questions_reports_them_and_plots_convergence_and_loss_weight(tmp_path):
    runs = tmp_path / "runs"
    train = {"iters": 10}
    params = {"study": {"seeds": [3, 4, 5], "arms": ["base"], "compare": [], "questions": QUESTIONS,
                        "data": str(tmp_path / "data"), "runs": str(runs), "store": str(tmp_path / "store.zarr")},
              "eval": {"split": "val"},
              **{arm: dict(train) for arm in question_arms(QUESTIONS)}}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    for arm, seeds in _by_seed().items():
        for seed, value in seeds.items():
            out = runs / f"{arm}-seed{seed}"
            out.mkdir(parents=True)
            (out / "eval.json").write_text(json.dumps({"mAP": value}))
            if arm in ("base", "pkd"):  # evaluated during training: convergence points
                (out / "eval.jsonl").write_text("".join(json.dumps({"iter": it, "mAP": value * it / 20}) + "\n"
                                                        for it in (10, 20)))
    out, plot = tmp_path / "study.json", tmp_path / "study.png"
    assert main(["--params", str(params_file), "--report-only", "--questions", "--out", str(out),
                 "--plot", str(plot)]) == 0
    report = json.loads(out.read_text())
    assert report["questions"]["pcc_vs_mse"]["mse"]["arm"] == "mse_mid"
    assert report["convergence"]["base"]["iters"] == [10, 20]
    gaps = report["questions"]["convergence_gaps"]
    assert set(gaps) == {"pkd"} and set(gaps["pkd"]) == {"10", "20"}
    assert (tmp_path / "study-convergence.png").stat().st_size > 0
    assert (tmp_path / "study-loss-weight.png").stat().st_size > 0
    main(["--params", str(params_file), "--report-only", "--out", str(out), "--plot", str(plot)])
    assert "questions" not in json.loads(out.read_text())  # only asked for


def test_convergence_gaps_pair_each_iteration_by_seed_against_the_baseline():
    convergence = {"base": {"iters": [500, 1000], "seeds": [3, 4, 5], "mAP": [[0.20, 0.25, 0.15], [0.50, 0.52, 0.51]]},
                   "pkd": {"iters": [500, 1000], "seeds": [4, 5, 6], "mAP": [[0.40, 0.30, 0.90], [0.55, 0.56, 0.90]]},
                   "lone": {"iters": [500, 1000], "seeds": [6], "mAP": [[0.5], [0.6]]}}
    gaps = convergence_gaps(convergence, "base")
    assert set(gaps) == {"pkd"}, "an arm sharing under two seeds with the baseline is left out"
    early = gaps["pkd"]["500"]
    assert early["seeds"] == [4, 5] and early["diffs"] == pytest.approx([0.15, 0.15])
    assert gaps["pkd"]["1000"]["diffs"] == pytest.approx([0.03, 0.05])
    assert convergence_gaps(convergence, "missing") == {}
    # another student family's arm is compared with its own baseline, never with this one
    other = {**convergence, "fcos_base": convergence["base"], "fcos_pkd": convergence["pkd"]}
    gaps = convergence_gaps(other, "base", {"fcos_pkd": "fcos_base"})
    assert set(gaps) == {"pkd", "fcos_pkd"}
