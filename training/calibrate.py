"""`pel calibrate`: a logit-to-probability map plus a decision threshold at a target false-positive rate.

- The map is `p = sigmoid(logit / T + b)`. `platt` (the default; Platt, "Probabilistic outputs
  for support vector machines", 1999) fits T > 0 and b; `temperature` (Guo et al., "On
  calibration of modern neural networks", ICML 2017) fits T with b = 0. Both minimise the
  binary negative log-likelihood on the calibration split (LBFGS on log T, so T stays positive).
  AUC and the verdicts at the threshold are unchanged by the map (it is monotone).
- Prior: the probabilities answer "how likely is this face fake if fakes made up `prior` of
  what is scored" (default 0.5). The split's samples are weighted to that share of fakes
  (`training.metrics.class_weights`), so the split's own ratio, an accident of how it was
  drawn, does not leak into the scores; `prior=None` fits the split as it is.
- Threshold: the smallest calibrated probability t such that at most `target_fpr` of the real
  crops of the split score `p >= t` (the service flags `p >= threshold`). Default 1 %: in
  moderation a false accusation of a real person costs more than a missed fake. At least
  `1 / target_fpr` real crops are required for the rate to be meaningful.
- All of it goes into the checkpoint metadata (`calibrated=True`), with the expected
  calibration error (15 equal-width bins) before and after in the provenance (on the split as
  it is, and weighted to the prior), and a reliability diagram PNG is drawn.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pel_model.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from pel_model.scorer import calibrated_probability

from .data import eval_arrays, manifest, read_index
from .metrics import binary_metrics, class_weights, expected_calibration_error
from .plots import reliability_diagram
from .scoring import predict_logits, sigmoid

log = logging.getLogger(__name__)


def fit_calibration(logits: np.ndarray, labels: np.ndarray, method: str = "platt",
                    prior: Optional[float] = 0.5, max_iter: int = 200) -> tuple[float, float]:
    """(T, b) minimising the binary NLL of `sigmoid(logits / T + b)`, samples weighted to
    `prior` (see the module doc); `method="temperature"` keeps b = 0."""
    if method not in ("platt", "temperature"):
        raise ValueError(f"unknown calibration method {method!r} (platt or temperature)")
    labels = np.asarray(labels, np.float64)
    if labels.size == 0 or len(np.unique(labels)) < 2:
        raise ValueError("calibration needs real and fake samples")
    z = torch.as_tensor(np.asarray(logits, np.float64))
    y = torch.as_tensor(labels)
    w = torch.as_tensor(class_weights(labels, prior))
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=method == "platt")
    params = [log_t, bias] if method == "platt" else [log_t]
    opt = torch.optim.LBFGS(params, lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            z / log_t.exp() + bias, y, weight=w, reduction="sum")
        loss.backward()
        return loss

    opt.step(closure)
    t, b = float(log_t.detach().exp()), float(bias.detach())
    if not (np.isfinite(t) and t > 0 and np.isfinite(b)):
        raise ValueError(f"calibration fit diverged (T={t}, b={b})")
    return t, b


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 200) -> float:
    """Temperature minimising the binary NLL of `sigmoid(logits / T)` on the split as it is."""
    return fit_calibration(logits, labels, "temperature", None, max_iter)[0]


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
    logit_bias: float
    threshold: float
    target_fpr: float
    method: str
    prior: Optional[float]
    ece_before: float
    ece_after: float
    ece_at_prior: Optional[dict]
    metrics: dict
    diagram: Path
    warnings: list[str]


def calibrate(checkpoint: Path, prepared: Path, split: str = "val", target_fpr: float = 0.01,
              output: Optional[Path] = None, batch_size: int = 64, seed: int = 0,
              device: str = "cpu", method: str = "platt",
              prior: Optional[float] = 0.5) -> Calibration:
    """Fit the map (T, b) and the threshold on `split` of `prepared`; write the calibrated
    checkpoint to `output` (default: `<name>.calibrated.safetensors` beside the input)."""
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
    temperature, bias = fit_calibration(logits, labels, method, prior)
    before, after = sigmoid(logits), calibrated_probability(logits, temperature, bias)
    threshold = threshold_for_fpr(after[labels == 0], target_fpr)
    warnings = squashed_scores_warning(after, temperature)
    for w in warnings:
        log.warning("%s", w)
    ece_before = expected_calibration_error(labels, before)
    ece_after = expected_calibration_error(labels, after)
    ece_at_prior = None if prior is None else {
        "prior": prior, "before": expected_calibration_error(labels, before, prior=prior),
        "after": expected_calibration_error(labels, after, prior=prior)}
    metrics = binary_metrics(labels, after, threshold)
    output = Path(output) if output else checkpoint.with_name(checkpoint.stem + ".calibrated.safetensors")
    provenance = dict(meta.provenance)
    provenance["calibration"] = {
        "prepared": str(prepared), "split": split, "n": int(labels.size), "n_real": n_real,
        "method": method, "prior": prior, "target_fpr": target_fpr,
        "ece_before": ece_before, "ece_after": ece_after, "ece_at_prior": ece_at_prior,
        "metrics_at_threshold": metrics, "warnings": warnings}
    new_meta = replace(meta, temperature=temperature, logit_bias=bias, threshold=threshold,
                       calibrated=True,
                       provenance=provenance)
    save_checkpoint(output, model, new_meta)
    diagram = reliability_diagram(labels, before, after, output.with_suffix(".reliability.png"))
    result = Calibration(output, temperature, bias, threshold, target_fpr, method, prior,
                         ece_before, ece_after, ece_at_prior, metrics, diagram, warnings)
    log.info("calibrated %s: %s", output, json.dumps({
        "method": method, "prior": prior, "T": temperature, "b": bias, "threshold": threshold,
        "ece_before": ece_before, "ece_after": ece_after, "ece_at_prior": ece_at_prior}))
    return result


def calibration_prior(meta: CheckpointMeta) -> float:
    """The share of fakes a checkpoint's probabilities refer to: the stated prior of its
    calibration, else (`--prior split`) its calibration split's share, else 0.5."""
    cal = meta.provenance.get("calibration", {})
    if cal.get("prior") is not None:
        return float(cal["prior"])
    if cal.get("n"):
        return 1.0 - cal["n_real"] / cal["n"]
    return 0.5
