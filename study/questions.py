"""The paper's research questions at study scale (``study.questions`` in the params file), from the finished runs.

- ``mse_sweep``: plain MSE imitation's loss weight, chosen on one seed (the best mAP of the swept weights);
- ``pcc_vs_mse``: PKD's PCC loss against MSE at the chosen weight, paired by seed (RQ2);
- ``loss_weight``: PKD at several loss weights, each paired with the reference weight by seed (RQ4);
- ``student_family``: per other student family, its baseline and offline PKD, paired by seed (RQ3);
- ``convergence_gaps``: each arm evaluated during training against the baseline at each evaluated iteration,
  paired by seed (the paper's "PKD converges faster").

Pure functions over ``{arm: {seed: mAP}}`` (and the report's ``convergence`` block), so the report's schema is
tested without training.
"""

from __future__ import annotations

from study.aggregate import paired, summarise


def _arm(by_seed: dict[str, dict[int, float]], arm: str) -> dict | None:
    """``summarise`` of the arm's runs plus their ``seeds``; None for an arm with no finished run."""
    runs = by_seed.get(arm) or {}
    return {"arm": arm, "seeds": sorted(runs), **summarise([runs[seed] for seed in sorted(runs)])} if runs else None


def mse_sweep(by_seed: dict[str, dict[int, float]], weights: dict[float, str], seed: int) -> dict | None:
    """``{"seed", "mAP": {weight: mAP}, "alpha", "arm"}``: each swept weight's mAP on ``seed`` and the weight with
    the highest (ties: the smaller weight); None until every swept arm has that seed."""
    if not all(seed in by_seed.get(arm, {}) for arm in weights.values()):
        return None
    maps = {float(weight): by_seed[arm][seed] for weight, arm in weights.items()}
    best = max(sorted(maps), key=lambda weight: maps[weight])
    return {"seed": seed, "mAP": maps, "alpha": best, "arm": weights[best]}


def question_report(by_seed: dict[str, dict[int, float]], questions: dict) -> dict:
    """The ``questions`` block of ``metrics/study.json`` from ``by_seed`` ({arm: {seed: mAP}}) and the params' block:
    ``{"mse_sweep": {"seed", "arms": {weight: arm}}, "pcc": arm, "baseline": arm, "loss_weight": {"reference": w,
    "arms": {weight: arm}}, "student_family": {name: {"baseline": arm, "offline": arm}}}`` (weights as numbers).

    Returns ``{"mse_sweep", "pcc_vs_mse", "loss_weight", "student_family"}``; a part whose runs have not finished
    is None (or, per weight or family, left out)."""
    pcc, baseline = questions["pcc"], questions["baseline"]
    sweep_spec = questions["mse_sweep"]
    sweep = mse_sweep(by_seed, {float(w): arm for w, arm in sweep_spec["arms"].items()}, sweep_spec["seed"])
    pcc_vs_mse = None
    if sweep is not None:
        mse = sweep["arm"]
        pcc_vs_mse = {"pcc": _arm(by_seed, pcc), "mse": _arm(by_seed, mse), "mse_alpha": sweep["alpha"],
                      "pcc_minus_mse": paired(by_seed.get(pcc, {}), by_seed.get(mse, {})),
                      "mse_minus_baseline": paired(by_seed.get(mse, {}), by_seed.get(baseline, {}))}
    spec = questions["loss_weight"]
    reference = spec["arms"][spec["reference"]]
    weights = {}
    for weight, arm in sorted(spec["arms"].items(), key=lambda item: float(item[0])):
        row = _arm(by_seed, arm)
        if row is not None:
            weights[str(float(weight))] = {**row, "minus_reference": None if arm == reference
                                           else paired(by_seed[arm], by_seed.get(reference, {}))}
    families = {}
    for name, arms in questions.get("student_family", {}).items():
        base, offline = _arm(by_seed, arms["baseline"]), _arm(by_seed, arms["offline"])
        if base or offline:
            families[name] = {"baseline": base, "offline": offline,
                              "offline_minus_baseline": paired(by_seed.get(arms["offline"], {}),
                                                               by_seed.get(arms["baseline"], {}))}
    return {"mse_sweep": sweep, "pcc_vs_mse": pcc_vs_mse,
            "loss_weight": {"reference": float(spec["reference"]), "weights": weights} if weights else None,
            "student_family": families}


def convergence_gaps(convergence: dict[str, dict], baseline: str,
                     own_baselines: dict[str, str] | None = None) -> dict[str, dict[str, dict]]:
    """``{arm: {iteration: paired(arm minus its baseline)}}`` from the report's ``convergence`` block (per arm its
    ``iters``, ``seeds`` and ``mAP`` [per iteration [per seed]]): at each evaluated iteration, each arm against
    its baseline on the seeds both evaluated (the paper's "PKD converges faster" is a positive gap early on).
    An arm's baseline is ``baseline`` unless ``own_baselines`` ({arm: baseline arm}, another student family's)
    names one; baselines are not compared; arms sharing fewer than two seeds with theirs are left out."""
    own_baselines = own_baselines or {}
    baselines = {baseline, *own_baselines.values()}
    gaps = {}
    for arm, curve in convergence.items():
        base = convergence.get(own_baselines.get(arm, baseline))
        if arm in baselines or base is None:
            continue
        base_at = {it: dict(zip(base["seeds"], row)) for it, row in zip(base["iters"], base["mAP"])}
        per_iter = {}
        for it, row in zip(curve["iters"], curve["mAP"]):
            if it in base_at:
                comparison = paired(dict(zip(curve["seeds"], row)), base_at[it])
                if comparison is not None:
                    per_iter[str(it)] = comparison
        if per_iter:
            gaps[arm] = per_iter
    return gaps


def question_arms(questions: dict) -> list[str]:
    """Every arm the questions block names (its runs are reported by ``question_report``), in a stable order."""
    arms = [*questions["mse_sweep"]["arms"].values(), questions["pcc"], questions["baseline"],
            *questions["loss_weight"]["arms"].values()]
    for family in questions.get("student_family", {}).values():
        arms += [family["baseline"], family["offline"]]
    return list(dict.fromkeys(arms))
