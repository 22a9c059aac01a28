"""Statistics over seeds: mean ± sample std, and paired differences with a t confidence interval."""
from __future__ import annotations

import math
from typing import Sequence

from scipy import stats


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
    half = float(stats.t.ppf(0.5 + confidence / 2, df=s["n"] - 1)) * s["std"] / math.sqrt(s["n"])
    low, high = s["mean"] - half, s["mean"] + half
    return {**s, "low": low, "high": high, "beyond_noise": bool(low > 0 or high < 0), "seeds": seeds}
