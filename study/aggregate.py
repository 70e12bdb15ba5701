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


def study_report(per_arm: dict[str, list[float]], *, reference: str = "baseline",
                 pairs: list[tuple[str, str]] = ()) -> dict:
    """The ``metrics/study.json`` body (without timings): ``{"arms": {name: summarise(...)}, "gain": {...},
    "comparisons": {"a vs b": compare(...)}}``.

    ``gain[name]`` is the arm's mean over the reference arm's mean (mAP) and that gain in units of the larger of
    the two arms' standard deviations (``gain_in_std``; None when both spreads are 0, to stay valid JSON).
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
    return report
