"""Per-arm mean and spread of the study's mAP values, and which arm differences the spread resolves.

Pure functions over plain dicts and lists, so the schema of ``metrics/study.json`` is tested without training.
"""

from __future__ import annotations

import math
import statistics

# Two-sided 95% Student t quantiles by degrees of freedom (larger df: the next smaller entry, conservative).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000}


def summarise(values: list[float]) -> dict:
    """``{"mAP": values, "mean": m, "std": s}``: s is the sample standard deviation (n - 1; 0.0 for one value)."""
    if not values:
        raise ValueError("an arm needs at least one mAP value")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mAP": [float(v) for v in values], "mean": statistics.fmean(values), "std": std}


def t_critical(dof: float) -> float:
    """The two-sided 95% t quantile for ``dof`` degrees of freedom (rounded down to a tabulated dof)."""
    known = [d for d in T_975 if d <= max(1.0, dof)]
    return T_975[max(known)]


def compare(a: dict, b: dict) -> dict:
    """Welch's t test of arm ``a`` minus arm ``b`` (each a ``summarise`` dict with >= 2 values).

    Returns ``{"diff", "se", "t", "dof", "significant"}``: diff of means (mAP), its standard error, t = diff / se,
    Welch-Satterthwaite degrees of freedom, and whether |t| exceeds the two-sided 95% quantile (t is None,
    and any nonzero diff significant, when both arms have zero spread).
    """
    na, nb = len(a["mAP"]), len(b["mAP"])
    va, vb = a["std"] ** 2 / na, b["std"] ** 2 / nb
    diff = a["mean"] - b["mean"]
    se = math.sqrt(va + vb)
    if se == 0.0:
        return {"diff": diff, "se": 0.0, "t": None, "dof": float(na + nb - 2), "significant": diff != 0.0}
    dof = (va + vb) ** 2 / ((va ** 2 / (na - 1) if na > 1 else 0.0) + (vb ** 2 / (nb - 1) if nb > 1 else 0.0) or 1e-300)
    t = diff / se
    return {"diff": diff, "se": se, "t": t, "dof": dof, "significant": abs(t) > t_critical(dof)}


def paired(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """The paired comparison of arm ``a`` minus arm ``b`` over the seeds both ran (``{seed: mAP}`` each): seed s
    gives every arm the same initialisation and data order, so the per-seed differences remove that shared part
    of the spread. Returns ``{"seeds", "diffs", "mean", "sd", "ci95": [low, high], "significant"}``: the mean
    difference (mAP) with its two-sided 95% Student t interval (n - 1 dof), significant when the interval excludes
    0; None with fewer than two common seeds."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diffs = [a[seed] - b[seed] for seed in seeds]
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = t_critical(len(seeds) - 1) * sd / math.sqrt(len(seeds))
    return {"seeds": seeds, "diffs": diffs, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half],
            "significant": mean - half > 0 or mean + half < 0}


def paired_by_teacher(a: dict[int, float], b: dict[int, float], teacher_of: dict[int, str]) -> dict | None:
    """:func:`paired` of ``a`` minus ``b`` within each teacher's seeds (``teacher_of``: {seed: teacher}, a seed
    learns from one teacher), and Welch's :func:`compare` of the two teachers' per-seed differences where exactly
    two teachers have two or more common seeds each. Returns ``{"per_teacher": {teacher: paired or None},
    "between": compare(first teacher's diffs, second's) or None}``; None when the common seeds have one teacher."""
    seeds = sorted(set(a) & set(b) & set(teacher_of))
    teachers = sorted({teacher_of[seed] for seed in seeds})
    if len(teachers) < 2:
        return None
    groups = {teacher: [seed for seed in seeds if teacher_of[seed] == teacher] for teacher in teachers}
    per_teacher = {teacher: paired({s: a[s] for s in group}, {s: b[s] for s in group})
                   for teacher, group in groups.items()}
    diffs = [test["diffs"] for test in per_teacher.values() if test is not None]  # teachers with two or more seeds
    between = compare(summarise(diffs[0]), summarise(diffs[1])) if len(teachers) == 2 and len(diffs) == 2 else None
    return {"per_teacher": per_teacher, "between": between}


def study_report(per_arm: dict[str, list[float]], *, reference: str = "baseline",
                 pairs: list[tuple[str, str]] = (), seeds: dict[str, list[int]] | None = None) -> dict:
    """The ``metrics/study.json`` body (without timings): ``{"arms": {name: summarise(...)}, "gain": {...},
    "comparisons": {"a vs b": compare(...)}}``.

    ``gain[name]`` is the arm's mean over the reference arm's mean (mAP) and that gain in units of the larger of
    the two arms' standard deviations (``gain_in_std``; None when both spreads are 0, to stay valid JSON).
    With ``seeds`` (each arm's seed per value), each comparison also carries its :func:`paired` test
    (``"paired"``, None without two common seeds) beside the Welch test.
    """
    arms = {name: summarise(values) for name, values in per_arm.items()}
    report: dict = {"arms": arms, "gain": {}, "comparisons": {}}
    if reference in arms:
        base = arms[reference]
        for name, arm in arms.items():
            if name == reference:
                continue
            gain = arm["mean"] - base["mean"]
            spread = max(arm["std"], base["std"])
            report["gain"][name] = {"vs": reference, "diff": gain,
                                    "gain_in_std": gain / spread if spread else None}
    for a, b in pairs:
        if a in arms and b in arms and len(arms[a]["mAP"]) > 1 and len(arms[b]["mAP"]) > 1:
            report["comparisons"][f"{a} vs {b}"] = compare(arms[a], arms[b])
            if seeds is not None:
                report["comparisons"][f"{a} vs {b}"]["paired"] = paired(dict(zip(seeds[a], per_arm[a])),
                                                                        dict(zip(seeds[b], per_arm[b])))
    return report


def seeds_needed(mean: float, sd: float, gain: float, margin: float, most: int = 100) -> int | None:
    """The fewest seeds with which a paired difference of this ``mean`` and ``sd`` would pass
    :func:`codec_decision`'s rule (its interval reaching 0 and its lower end above ``-margin * gain``), assuming
    both stay as measured; None if no count up to ``most`` would."""
    for n in range(2, most + 1):
        half = t_critical(n - 1) * sd / math.sqrt(n)
        if mean + half >= 0 and mean - half > -margin * gain:
            return n
    return None


def codec_decision(by_seed: dict[str, dict[int, float]], points: dict[str, dict], rule: dict,
                   teacher_of: dict[int, str] | None = None) -> dict:
    """The default codec by the study's rule (``study.codec_rule`` in the params file): the smallest store (bits
    per value) whose paired difference from the reference arm (fp32) is not significantly negative (its 95%
    interval reaches 0) and whose interval's lower end lies above ``-margin`` times the reference's gain over the
    baseline. The reference itself always passes, so with no smaller store passing the decision is fp32.

    ``by_seed``: {arm: {seed: mAP}}; ``points``: {arm: {"codec", "pca_step", "bits_per_value"}} for the reference
    and the candidates; ``rule``: {"reference", "baseline", "margin", "candidates"}. Returns {"codec",
    "pca_step", "bits_per_value", "paired_diff_ci95", "gain", "margin", "arm", "seeds", "candidates"} where
    "candidates" says, per candidate arm with a store point, its paired test, whether it passes, and (for one
    that fails) how many seeds the rule would need at the measured mean and sd (None: no number would). With
    ``teacher_of`` ({seed: teacher}), each candidate also carries ``by_teacher`` (:func:`paired_by_teacher`):
    the rule pools the teachers' seeds, the split shows whether one teacher's store behaves apart.
    """
    reference, margin = rule["reference"], rule["margin"]
    gain = statistics.fmean(by_seed[reference].values()) - statistics.fmean(by_seed[rule["baseline"]].values())
    candidates = {}
    for arm in rule["candidates"]:
        if arm not in points or arm not in by_seed:
            continue
        test = paired(by_seed[arm], by_seed[reference])
        passes = test is not None and test["ci95"][1] >= 0 and test["ci95"][0] > -margin * gain
        candidates[arm] = {"bits_per_value": points[arm]["bits_per_value"], "paired": test, "passes": passes,
                           "seeds_needed": None if passes or test is None
                           else seeds_needed(test["mean"], test["sd"], gain, margin),
                           "by_teacher": paired_by_teacher(by_seed[arm], by_seed[reference], teacher_of)
                           if teacher_of else None}
    passing = [arm for arm, row in candidates.items() if row["passes"]]
    arm = min(passing, key=lambda name: candidates[name]["bits_per_value"]) if passing else reference
    chosen = candidates[arm]["paired"] if arm in candidates else None
    return {"codec": points[arm]["codec"], "pca_step": points[arm].get("pca_step"),
            "bits_per_value": points[arm]["bits_per_value"],
            "paired_diff_ci95": chosen["ci95"] if chosen else [0.0, 0.0], "gain": gain, "margin": margin,
            "arm": arm, "seeds": chosen["seeds"] if chosen else sorted(by_seed[reference]),
            "candidates": candidates}
