"""Statistics over seeds: mean ± sample std, and paired differences with a t confidence interval."""
from __future__ import annotations

import math
from typing import Sequence



def summary(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation (n-1; 0 for one value) and n."""
    n = len(values)
    if n == 0:
        raise ValueError("summary of no values")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def paired_difference(a: dict[int, float], b: dict[int, float], confidence: float = 0.95) -> dict:
    """a - b over the seeds both have, with a two-sided Student-t interval on the mean difference.

    Pairing by seed removes what the seeds share (the same teacher, the same data order), so
    the interval is on the effect itself. `beyond_noise` says the interval excludes 0; with
    fewer than two pairs there is no interval.
    """
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        raise ValueError("paired difference of runs that share no seed")
    s = summary(diffs)
    if s["n"] < 2:
        return {**s, "low": None, "high": None, "beyond_noise": False, "seeds": seeds}
    from scipy import stats  # here: scipy costs half a second to import, and most stages never need it

    half = float(stats.t.ppf(0.5 + confidence / 2, df=s["n"] - 1)) * s["std"] / math.sqrt(s["n"])
    low, high = s["mean"] - half, s["mean"] + half
    return {**s, "low": low, "high": high, "beyond_noise": bool(low > 0 or high < 0), "seeds": seeds}


def seed_table(accs: dict[str, dict[int, float]], labels: dict[str, str], contrasts: list[tuple[str, str]],
               confidence: float = 0.95) -> dict:
    """Per variant: mean ± std over its seeds and the per-seed values; per contrast (a, b): the
    paired difference a - b. Variants are read in the order of `accs`."""
    rows = [{"variant": v, "label": labels.get(v, v), **summary(list(by_seed.values())), "per_seed": dict(by_seed)}
            for v, by_seed in accs.items()]
    diffs = [{"a": a, "b": b, "label": f"{labels.get(a, a)} - {labels.get(b, b)}",
              **paired_difference(accs[a], accs[b], confidence)} for a, b in contrasts]
    return {"confidence": confidence, "rows": rows, "contrasts": diffs}
