"""Statistics over seeds: mean ± sample std, paired differences with a t confidence interval and p-value, and the
Holm–Bonferroni correction over a table's contrasts (scipy for t, statsmodels for Holm)."""
from __future__ import annotations

import math
from typing import Sequence

CORRECTION = "holm"  # statsmodels.stats.multitest.multipletests' name for Holm–Bonferroni


def summary(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation (n-1; 0 for one value) and n."""
    n = len(values)
    if n == 0:
        raise ValueError("summary of no values")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def paired_difference(a: dict[int, float], b: dict[int, float], confidence: float = 0.95) -> dict:
    """a - b over the seeds both have, with a two-sided Student-t interval on the mean difference and the paired
    t-test's p-value.

    Pairing by seed removes what the seeds share (the same teacher, the same data order), so
    the interval is on the effect itself. `beyond_noise` says the interval excludes 0 (p < 1 - confidence);
    with fewer than two pairs there is no interval. Alone, one contrast needs no correction; in a table,
    seed_table replaces `beyond_noise` with the corrected verdict.
    """
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        raise ValueError("paired difference of runs that share no seed")
    s = summary(diffs)
    if s["n"] < 2:
        return {**s, "low": None, "high": None, "p": None, "beyond_noise": False, "seeds": seeds}
    from scipy import stats  # here: scipy costs half a second to import, and most stages never need it

    half = float(stats.t.ppf(0.5 + confidence / 2, df=s["n"] - 1)) * s["std"] / math.sqrt(s["n"])
    low, high = s["mean"] - half, s["mean"] + half
    if s["std"] == 0:  # identical differences: t is infinite, or 0/0 when they are all 0
        p = 0.0 if s["mean"] != 0 else 1.0
    else:
        p = float(stats.ttest_1samp(diffs, 0.0).pvalue)
    return {**s, "low": low, "high": high, "p": p, "beyond_noise": bool(low > 0 or high < 0), "seeds": seeds}


def holm(contrasts: list[dict], confidence: float = 0.95) -> list[dict]:
    """Each contrast with `p_holm` (its Holm–Bonferroni adjusted p-value over the contrasts that have a p-value),
    `beyond_noise` read from it (p_holm < 1 - confidence: the family-wise error rate is held at that level), and
    the per-contrast verdict kept as `beyond_noise_uncorrected`."""
    tested = [i for i, c in enumerate(contrasts) if c["p"] is not None]
    adjusted: dict[int, float] = {}
    if tested:
        from statsmodels.stats.multitest import multipletests  # here: a 2 s import only reports pay

        _, p_adj, _, _ = multipletests([contrasts[i]["p"] for i in tested], alpha=1 - confidence, method=CORRECTION)
        adjusted = {i: float(p) for i, p in zip(tested, p_adj)}
    return [{**c, "beyond_noise_uncorrected": c["beyond_noise"], "p_holm": adjusted.get(i),
             "beyond_noise": i in adjusted and adjusted[i] < 1 - confidence, "family": len(tested)}
            for i, c in enumerate(contrasts)]


def seed_table(accs: dict[str, dict[int, float]], labels: dict[str, str], contrasts: list[tuple[str, str]],
               confidence: float = 0.95) -> dict:
    """Per variant: mean ± std over its seeds and the per-seed values; per contrast (a, b): the
    paired difference a - b, Holm-corrected over the table's contrasts. Variants are read in the order of `accs`."""
    rows = [{"variant": v, "label": labels.get(v, v), **summary(list(by_seed.values())), "per_seed": dict(by_seed)}
            for v, by_seed in accs.items()]
    diffs = [{"a": a, "b": b, "label": f"{labels.get(a, a)} - {labels.get(b, b)}",
              **paired_difference(accs[a], accs[b], confidence)} for a, b in contrasts]
    return {"confidence": confidence, "correction": CORRECTION, "rows": rows, "contrasts": holm(diffs, confidence)}
