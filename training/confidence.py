"""Confidence intervals for AUC and for paired AUC deltas: a cluster bootstrap.

Efron & Tibshirani, "An Introduction to the Bootstrap" (1993), percentile intervals; the
resampling unit is a cluster (Field & Welsh, "Bootstrapping clustered data", JRSS-B 2007): the
source video a crop comes from (`group` in a prepared index; a fake shares its real source's
group), else the video itself. Every score set (clean and each perturbation) is scored on the
same resampled clusters, so a delta's interval is paired and much narrower than the two
AUCs' intervals would suggest.

A resample is a vector of counts per cluster (multinomial), i.e. per-crop weights; the
weighted AUC needs one sort per score set, so 1,000 resamples of 3,000 crops take seconds.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def weighted_auc(labels, scores, weights: np.ndarray) -> np.ndarray:
    """AUC (ties count one half) under per-sample weights; `weights` (n,) or (B, n) gives one
    AUC per row. Equals `sklearn.metrics.roc_auc_score(labels, scores, sample_weight=w)`."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, np.float64).ravel()
    w = np.atleast_2d(np.asarray(weights, np.float64))
    order = np.argsort(s, kind="mergesort")
    s, y, w = s[order], y[order], w[:, order]
    starts = np.r_[0, np.nonzero(np.diff(s))[0] + 1]  # first index of each distinct score
    neg = np.add.reduceat(np.where(y, 0.0, w), starts, axis=1)
    pos = np.add.reduceat(np.where(y, w, 0.0), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negative weight with a lower score
    wins = (pos * (below + 0.5 * neg)).sum(axis=1)
    return wins / (pos.sum(axis=1) * neg.sum(axis=1))


def cluster_weights(clusters: Sequence[str], resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples, n) weights: each row draws as many clusters as there are, with replacement,
    and gives every sample its cluster's draw count."""
    _, idx = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
    k = int(idx.max()) + 1
    counts = np.random.default_rng(seed).multinomial(k, np.full(k, 1.0 / k), size=resamples)
    return counts[:, idx].astype(np.float64)


def auc_intervals(labels, scores: dict[str, np.ndarray], clusters: Sequence[str],
                  reference: str = "clean", resamples: int = 1000, level: float = 0.95,
                  seed: int = 0) -> Optional[dict]:
    """{name: {"auc": [lo, hi], "delta_auc": [lo, hi] (not for `reference`)}} plus the
    settings; None when the labels hold one class only. Resamples that draw one class only
    are dropped (and counted)."""
    y = np.asarray(labels).ravel()
    if y.min() == y.max():
        return None
    w = cluster_weights(clusters, resamples, seed)
    both = ((w * y).sum(axis=1) > 0) & ((w * (1 - y)).sum(axis=1) > 0)
    w = w[both]
    aucs = {name: weighted_auc(y, s, w) for name, s in scores.items()}
    lo, hi = 50 * (1 - level), 50 * (1 + level)

    def interval(x: np.ndarray) -> list[float]:
        return [float(v) for v in np.percentile(x, [lo, hi])]

    out: dict = {"level": level, "resamples": int(both.sum()), "dropped": int((~both).sum()),
                 "clusters": int(len(set(map(str, clusters))))}
    for name, a in aucs.items():
        out[name] = {"auc": interval(a)}
        if name != reference and reference in aucs:
            out[name]["delta_auc"] = interval(a - aucs[reference])
    return out
