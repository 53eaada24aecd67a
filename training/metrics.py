"""Detection metrics: accuracy, ROC/AUC, EER, expected calibration error, video-level pooling.

Conventions: label 1 = fake (positive class), score = fake probability (or any monotone score).
`roc_curve` has one point per distinct score (like scikit-learn with drop_intermediate=False) and
AUC is the trapezoidal area under it (equal to `sklearn.metrics.roc_auc_score`, ties included).
EER is where the false-positive rate equals the false-negative rate, linearly interpolated between
the two ROC points that bracket it.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import numpy as np


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels).ravel(), np.asarray(scores, np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels but {scores.size} scores")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (real) or 1 (fake)")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return labels.astype(np.int64), scores


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), starting at (0, 0) with threshold +inf; predicted fake if score >= t."""
    y, s = _check(labels, scores)
    pos, neg = int(y.sum()), int((1 - y).sum())
    if pos == 0 or neg == 0:
        raise ValueError("ROC needs both real and fake samples")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return (np.r_[0.0, fp / neg], np.r_[0.0, tp / pos], np.r_[np.inf, s[last]])


def auc(labels, scores) -> float:
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(np.trapezoid(tpr, fpr))


def eer(labels, scores) -> float:
    fpr, tpr, _ = roc_curve(labels, scores)
    return eer_from_roc(fpr, tpr)


def eer_from_roc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    fnr = 1.0 - tpr
    d = fnr - fpr  # decreasing from 1 to -1 along the curve
    i = int(np.nonzero(d <= 0)[0][0])
    if d[i] == 0 or i == 0:
        return float(fpr[i])
    t = d[i - 1] / (d[i - 1] - d[i])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def accuracy(labels, probs, threshold: float = 0.5) -> float:
    y, p = _check(labels, probs)
    return float(((p >= threshold).astype(np.int64) == y).mean())


def binary_metrics(labels, probs, threshold: float = 0.5) -> dict:
    """Acc (at `threshold`), AUC, EER, counts and the real/fake error rates at the threshold."""
    y, p = _check(labels, probs)
    out = {"n": int(y.size), "n_real": int((y == 0).sum()), "n_fake": int(y.sum()),
           "acc": accuracy(y, p, threshold), "threshold": float(threshold)}
    if out["n_real"]:
        out["fpr"] = float((p[y == 0] >= threshold).mean())
    if out["n_fake"]:
        out["fnr"] = float((p[y == 1] < threshold).mean())
    if out["n_real"] and out["n_fake"]:
        fpr, tpr, _ = roc_curve(y, p)
        out["auc"] = float(np.trapezoid(tpr, fpr))
        out["eer"] = eer_from_roc(fpr, tpr)
    return out


def class_weights(labels, prior: Optional[float] = None) -> np.ndarray:
    """Per-sample weights summing to 1 under which fakes make up `prior` of the data (reals
    1 - prior); `None`: uniform, the data's own share."""
    y = np.asarray(labels).ravel()
    if prior is None:
        return np.full(y.size, 1.0 / y.size)
    n_fake = int(y.sum())
    if n_fake in (0, y.size):
        raise ValueError("re-weighting to a prior needs real and fake samples")
    return np.where(y == 1, prior / n_fake, (1.0 - prior) / (y.size - n_fake))


def expected_calibration_error(labels, probs, bins: int = 15, prior: Optional[float] = None) -> float:
    """Binary ECE: bins of equal width over the fake probability; sum over bins of
    (bin mass) * |mean predicted probability - fraction of fakes|. With `prior`, samples are
    weighted so that fakes make up that share (see `class_weights`): the ECE that probabilities
    calibrated for that share should be judged by, whatever the sample's own ratio."""
    y, p = _check(labels, probs)
    w = class_weights(y, prior)
    idx = np.minimum((p * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            m = w[sel].sum()
            total += m * abs(np.dot(w[sel], p[sel]) / m - np.dot(w[sel], y[sel]) / m)
    return float(total)


def reliability(labels, probs, bins: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bin centres, fraction of fakes per bin (nan if empty), counts) for reliability diagrams."""
    y, p = _check(labels, probs)
    idx = np.minimum((p * bins).astype(np.int64), bins - 1)
    counts = np.bincount(idx, minlength=bins)
    frac = np.bincount(idx, weights=y, minlength=bins) / np.maximum(counts, 1)
    frac[counts == 0] = np.nan
    return (np.arange(bins) + 0.5) / bins, frac, counts


def video_level(videos: list[str], labels, probs) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Video score = mean of its frame probabilities; a video's frames must share one label."""
    y, p = _check(labels, probs)
    groups: "OrderedDict[str, list[int]]" = OrderedDict()
    for i, v in enumerate(videos):
        groups.setdefault(v, []).append(i)
    ids, vy, vp = [], [], []
    for v, idx in groups.items():
        lab = set(y[idx].tolist())
        if len(lab) != 1:
            raise ValueError(f"video {v} has frames with different labels")
        ids.append(v)
        vy.append(lab.pop())
        vp.append(float(p[idx].mean()))
    return ids, np.array(vy, np.int64), np.array(vp)
