"""`pel calibrate`: temperature scaling plus a decision threshold at a target false-positive rate.

- Temperature T > 0 minimises the negative log-likelihood of `sigmoid(logit / T)` on the
  calibration split (LBFGS on log T, so T stays positive). AUC is unchanged by T.
- Threshold: the smallest calibrated probability t such that at most `target_fpr` of the real
  crops of the split score `p >= t` (the service flags `p >= threshold`). Default 1 %: in
  moderation a false accusation of a real person costs more than a missed fake. At least
  `1 / target_fpr` real crops are required for the rate to be meaningful.
- Both are written into the checkpoint metadata (`calibrated=True`), with the expected
  calibration error (15 equal-width bins) before and after in the provenance, and a reliability
  diagram PNG is drawn.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pel_model.checkpoint import load_checkpoint, save_checkpoint

from .data import eval_arrays, manifest, read_index
from .metrics import binary_metrics, expected_calibration_error
from .plots import reliability_diagram
from .scoring import predict_logits, sigmoid

log = logging.getLogger(__name__)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 200) -> float:
    """Temperature minimising the binary NLL of `sigmoid(logits / T)`."""
    z = torch.as_tensor(np.asarray(logits, np.float64))
    y = torch.as_tensor(np.asarray(labels, np.float64))
    if z.numel() == 0 or len(torch.unique(y)) < 2:
        raise ValueError("temperature scaling needs real and fake samples")
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"temperature fit diverged (T={t})")
    return t


def threshold_for_fpr(real_probs: np.ndarray, target_fpr: float) -> float:
    """Smallest t with mean(real_probs >= t) <= target_fpr (kept inside (0, 1))."""
    p = np.sort(np.asarray(real_probs, np.float64))
    if p.size == 0:
        raise ValueError("no real samples to set the threshold on")
    k = int(np.floor(target_fpr * p.size))  # false positives allowed
    t = np.nextafter(p[p.size - k - 1], np.inf)  # just above the (k+1)-th highest real score
    return float(np.clip(t, 1e-6, 1 - 1e-6))


def squashed_scores_warning(probs: np.ndarray, temperature: float, max_t: float = 4.0,
                            min_spread: float = 0.2) -> list[str]:
    """Warnings when calibration squeezes the scores into a narrow band (a weak model: a large
    T flattens every logit): the threshold then sits on a steep slope and small score shifts
    between the calibration data and the stream change many decisions."""
    lo, hi = np.quantile(probs, [0.05, 0.95])
    out = []
    if temperature > max_t or hi - lo < min_spread:
        out.append(f"calibrated scores are squeezed into a narrow band (T={temperature:.2f}, "
                   f"90 % of probabilities in [{lo:.3f}, {hi:.3f}]): the model separates the "
                   "classes weakly, and the threshold's false-positive rate will not hold on "
                   "other data; train longer or on more data before serving it")
    return out


@dataclass
class Calibration:
    checkpoint: Path
    temperature: float
    threshold: float
    target_fpr: float
    ece_before: float
    ece_after: float
    metrics: dict
    diagram: Path
    warnings: list[str]


def calibrate(checkpoint: Path, prepared: Path, split: str = "val", target_fpr: float = 0.01,
              output: Optional[Path] = None, batch_size: int = 64, seed: int = 0,
              device: str = "cpu") -> Calibration:
    """Fit T and the threshold on `split` of `prepared`; write the calibrated checkpoint to
    `output` (default: `<name>.calibrated.safetensors` beside the input)."""
    checkpoint = Path(checkpoint)
    model, meta = load_checkpoint(checkpoint, device)
    if manifest(prepared)["size"] != meta.model.input_size:
        raise ValueError(f"{prepared} holds {manifest(prepared)['size']}px crops, the checkpoint "
                         f"expects {meta.model.input_size}px")
    rows = read_index(prepared, split)
    crops, labels, _ = eval_arrays(prepared, rows, seed)
    n_real = int((labels == 0).sum())
    if n_real < 1.0 / target_fpr:
        log.warning("only %d real crops in %r: a %.3g false-positive rate cannot be set reliably "
                    "(needs >= %d)", n_real, split, target_fpr, int(np.ceil(1 / target_fpr)))
    logits = predict_logits(model, crops, batch_size, device)
    temperature = fit_temperature(logits, labels)
    before, after = sigmoid(logits), sigmoid(logits / temperature)
    threshold = threshold_for_fpr(after[labels == 0], target_fpr)
    warnings = squashed_scores_warning(after, temperature)
    for w in warnings:
        log.warning("%s", w)
    ece_before = expected_calibration_error(labels, before)
    ece_after = expected_calibration_error(labels, after)
    metrics = binary_metrics(labels, after, threshold)
    output = Path(output) if output else checkpoint.with_name(checkpoint.stem + ".calibrated.safetensors")
    provenance = dict(meta.provenance)
    provenance["calibration"] = {
        "prepared": str(prepared), "split": split, "n": int(labels.size), "n_real": n_real,
        "target_fpr": target_fpr, "ece_before": ece_before, "ece_after": ece_after,
        "metrics_at_threshold": metrics, "warnings": warnings}
    new_meta = replace(meta, temperature=temperature, threshold=threshold, calibrated=True,
                       provenance=provenance)
    save_checkpoint(output, model, new_meta)
    diagram = reliability_diagram(labels, before, after, output.with_suffix(".reliability.png"))
    result = Calibration(output, temperature, threshold, target_fpr, ece_before, ece_after,
                         metrics, diagram, warnings)
    log.info("calibrated %s: %s", output, json.dumps({"T": temperature, "threshold": threshold,
                                                      "ece_before": ece_before, "ece_after": ece_after}))
    return result
