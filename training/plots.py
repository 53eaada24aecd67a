"""PNG figures (matplotlib, Agg backend): reliability diagram, ROC curves, score histograms,
training curve."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .metrics import reliability, roc_curve


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reliability_diagram(labels, before, after, path: Path, bins: int = 15) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    for probs, name in ((before, "before (T=1)"), (after, "after calibration")):
        centres, frac, _ = reliability(labels, probs, bins)
        ax.plot(centres, frac, "o-", label=name)
    ax.set(xlabel="predicted fake probability", ylabel="fraction fake", xlim=(0, 1), ylim=(0, 1),
           title="Reliability")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, plt, path)


def roc_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """`curves`: name -> (labels, scores)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    for name, (y, s) in curves.items():
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=name)
    ax.set(xlabel="false-positive rate (real flagged)", ylabel="true-positive rate", title="ROC")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, plt, path)


def score_histogram(labels, probs, threshold: float, path: Path) -> Path:
    plt = _plt()
    y, p = np.asarray(labels), np.asarray(probs)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = np.linspace(0, 1, 41)
    ax.hist(p[y == 0], bins, alpha=0.6, label="real")
    ax.hist(p[y == 1], bins, alpha=0.6, label="fake")
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.3f}")
    ax.set(xlabel="fake probability", ylabel="crops", title="Score distribution")
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def training_curve(history: list[dict], path: Path) -> Path:
    """Per-epoch train/val loss and validation AUC from the checkpoint's provenance history."""
    plt = _plt()
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    ax.plot(epochs, [h.get("val_loss", np.nan) for h in history], "s-", label="val loss")
    ax.set(xlabel="epoch", ylabel="BCE loss", title="Training curve")
    auc = ax.twinx()
    auc.plot(epochs, [h.get("val_auc", np.nan) for h in history], "^-", color="C2", label="val AUC")
    auc.set(ylabel="val AUC", ylim=(0.4, 1.0))
    fig.legend(loc="upper right", fontsize=8)
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
