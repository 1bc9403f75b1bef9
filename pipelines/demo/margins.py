"""Margins for the report's comparisons: a difference between two settings counts only when it exceeds the spread
of repeated draws. The same prompts and seeds are sampled under both settings, so each (prompt, seed) is a pair;
resampling the pairs with replacement (the bootstrap) gives the interval the mean difference would wander over
had other prompts and seeds been drawn. A comparison whose 95 % interval lies above zero is "met", below zero
"not met", and across zero "within noise"."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MET, WITHIN_NOISE, NOT_MET = "met", "within noise", "not met"


def paired_difference(better: Sequence[float], worse: Sequence[float], resamples: int = 4000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """The mean of ``better − worse`` over paired units and its bootstrap interval: ``{"difference", "interval"
    [lo, hi], "units"}``; pairs with a non-finite value on either side are left out (and counted)."""
    a, b = np.asarray(better, np.float64), np.asarray(worse, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values must match, got {a.shape} and {b.shape}")
    finite = np.isfinite(a) & np.isfinite(b)
    d = (a - b)[finite]
    if len(d) == 0:
        return {"difference": None, "interval": None, "units": 0, "left_out": int((~finite).sum())}
    means = d[np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"difference": round(float(d.mean()), 4), "interval": [round(float(lo), 4), round(float(hi), 4)],
            "units": int(len(d)), "left_out": int((~finite).sum())}


def verdict(comparison: dict) -> str:
    """``met`` when the interval lies above zero, ``not met`` below (or with no pairs), else ``within noise``."""
    if comparison["interval"] is None:
        return NOT_MET
    lo, hi = comparison["interval"]
    return MET if lo > 0 else NOT_MET if hi < 0 else WITHIN_NOISE


def mean_interval(values: Sequence[float], resamples: int = 4000, seed: int = 0, level: float = 0.95) -> list | None:
    """The bootstrap interval of the mean of ``values`` (unpaired: the spread a single figure carries)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return None
    means = v[np.random.default_rng(seed).integers(0, len(v), (resamples, len(v)))].mean(axis=1)
    return [round(float(q), 4) for q in np.quantile(means, [(1 - level) / 2, (1 + level) / 2])]
