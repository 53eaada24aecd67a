"""`pel evaluate`: a checkpoint on a prepared split (any adapter: cross-dataset is just another
prepared folder), clean and under perturbations.

Probabilities are `sigmoid(logit / T + b)` with the checkpoint's calibration; accuracy uses the
checkpoint's threshold. Frame level: every crop. Video level: a video's score is the mean of its
frame probabilities. Robustness (as in the paper's Table 3): the crops are perturbed with
Gaussian noise, salt-and-pepper noise, Gaussian blur or JPEG re-compression and metrics are
reported with their deltas against the clean crops. Writes `report.json`, `roc.png` and
`scores.png` to the output folder, and per-crop scores (clean and under each perturbation) to
`scores.csv`. With `bootstrap` > 0, 95 % intervals of every AUC and of every paired delta AUC
(`training.confidence`, resampling source videos) go into `report["confidence"]`. With
`int8_calibration`, the report also says what the INT8 (Q/DQ) graph costs against FP32 on the
same crops (`report["int8"]`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np

import torch

from pel_model.checkpoint import CheckpointMeta, load_checkpoint
from pel_model.config import ModelConfig
from pel_model.pel import PEL
from pel_model.scorer import calibrated_probability

from . import augment as A
from .calibrate import calibration_prior
from .confidence import auc_intervals
from .data import eval_arrays, manifest, read_index
from .metrics import auc, binary_metrics, expected_calibration_error, video_level
from .plots import roc_plot, score_histogram
from .scoring import predict_logits, sigmoid

log = logging.getLogger(__name__)

# name -> default strength: noise std (0-255 scale), corrupted pixel fraction, blur sigma (px),
# JPEG quality, downscale factor (down and back up), H.264 CRF.
PERTURBATIONS: dict[str, float] = {"gaussian_noise": 10.0, "salt_pepper": 0.01,
                                   "gaussian_blur": 1.5, "jpeg": 50.0, "downscale": 0.5,
                                   "h264": 32.0}


def perturb(crops: np.ndarray, kind: str, strength: float, seed: int = 0) -> np.ndarray:
    """A perturbed copy of uint8 crops (N, S, S, 3); deterministic under `seed`. The same
    functions as training augmentation (`training.augment`), at a fixed strength."""
    rng = np.random.default_rng(seed)
    one = {"gaussian_noise": lambda c: A.gaussian_noise(c, strength, rng),
           "salt_pepper": lambda c: A.salt_pepper(c, strength, rng),
           "gaussian_blur": lambda c: A.gaussian_blur(c, strength),
           "jpeg": lambda c: A.jpeg(c, int(strength)),
           "downscale": lambda c: A.rescale(c, strength),
           "h264": lambda c: A.h264(c, int(strength))}.get(kind)
    if one is None:
        raise ValueError(f"unknown perturbation {kind!r}: use {sorted(PERTURBATIONS)}")
    return np.stack([one(c) for c in crops])


def parse_perturbations(spec: Optional[str]) -> dict[str, float]:
    """"all", "none"/"" or "jpeg:70,gaussian_blur:2,salt_pepper" -> {name: strength}."""
    if spec is None or spec.strip() in ("", "none"):
        return {}
    if spec.strip() == "all":
        return dict(PERTURBATIONS)
    out = {}
    for item in spec.split(","):
        name, _, value = item.strip().partition(":")
        if name not in PERTURBATIONS:
            raise ValueError(f"unknown perturbation {name!r}: use {sorted(PERTURBATIONS)}")
        out[name] = float(value) if value else PERTURBATIONS[name]
    return out


def _levels(labels, probs, videos, threshold) -> dict:
    _, vy, vp = video_level(videos, labels, probs)
    return {"frame": binary_metrics(labels, probs, threshold),
            "video": binary_metrics(vy, vp, threshold)}


def _delta(clean: dict, other: dict) -> dict:
    return {level: {k: other[level][k] - clean[level][k] for k in ("acc", "auc", "eer")
                    if k in clean[level] and k in other[level]} for level in ("frame", "video")}


def int8_accuracy_cost(fp32_path: Path, int8_path: Path, crops: np.ndarray, labels: np.ndarray,
                       threshold: float = 0.5, temperature: float = 1.0, batch_size: int = 32,
                       bias: float = 0.0) -> dict:
    """What INT8 costs on labelled crops: AUC of both graphs, decision agreement at `threshold`
    (the service flags `p >= threshold`), and the largest probability change.

    Both graphs run in ONNX Runtime on the CPU, so the comparison isolates quantisation.
    """
    from pel_model.backends import OnnxRuntimeBackend

    labels = np.asarray(labels)

    def probs(path: Path) -> np.ndarray:
        backend = OnnxRuntimeBackend(path, crops.shape[1])
        logits = np.concatenate([backend.logits(crops[i:i + batch_size])
                                 for i in range(0, len(crops), batch_size)])
        return calibrated_probability(logits, temperature, bias)

    p32, p8 = probs(fp32_path), probs(int8_path)
    both = labels.min() != labels.max()
    auc32, auc8 = (auc(labels, p32), auc(labels, p8)) if both else (float("nan"), float("nan"))
    return {"n": int(len(labels)), "threshold": float(threshold), "auc_fp32": auc32,
            "auc_int8": auc8, "auc_drop": auc32 - auc8,
            "decision_agreement": float(np.mean((p32 >= threshold) == (p8 >= threshold))),
            "flagged_fp32": float(np.mean(p32 >= threshold)),
            "flagged_int8": float(np.mean(p8 >= threshold)),
            "max_abs_prob_change": float(np.max(np.abs(p8 - p32)))}


def int8_cost(model, meta, crops: np.ndarray, labels: np.ndarray, calibration: Path,
              out_dir: Path, keep_float: tuple[str, ...] = ()) -> dict:
    """Quantise the checkpoint's ONNX graph to INT8 (Q/DQ) with crops from `calibration` and
    compare it with FP32 on these crops: AUC drop and decision agreement at the threshold."""
    from pel_model.export import export_onnx
    from pel_model.quantize import load_calibration_crops, quantize_int8

    fp32 = export_onnx(model, out_dir / "model.onnx")
    calib = load_calibration_crops(calibration, meta.model.input_size)
    int8 = quantize_int8(fp32, out_dir / "model.int8.onnx", calib, keep_float=keep_float)
    cost = int8_accuracy_cost(fp32, int8, crops, labels, meta.threshold, meta.temperature,
                              bias=meta.logit_bias)
    log.info("INT8 vs FP32 on %d crops: AUC %.4f -> %.4f, decision agreement %.4f", cost["n"],
             cost["auc_fp32"], cost["auc_int8"], cost["decision_agreement"])
    return {**cost, "calibration": str(calibration), "calibration_crops": int(len(calib)),
            "keep_float": list(keep_float), "onnx_int8": str(int8)}


def load_for_evaluation(checkpoint: Optional[Path], model_cfg: Optional[ModelConfig] = None,
                        device: str = "cpu"):
    """(model, meta) of a checkpoint, or with `checkpoint=None` the untrained network the
    service runs without one (same seed): a chance baseline."""
    if checkpoint is not None:
        return load_checkpoint(checkpoint, device)
    torch.manual_seed(0)
    model = PEL(model_cfg or ModelConfig(), load_pretrained=False).to(device).eval()
    return model, CheckpointMeta(model=model.cfg)


def by_dataset(rows: list[dict], labels: np.ndarray, probs: np.ndarray, threshold: float,
               default: str) -> dict:
    """Frame metrics per dataset tag of the rows (e.g. the DFDC crops and the real photos of
    one prepared folder): a real-only dataset still reports its false-positive rate. ECE per
    dataset too: each has its own real:fake ratio, and calibration depends on it."""
    tags = np.array([r.get("dataset") or default for r in rows])
    out = {}
    for t in sorted(set(tags.tolist())):
        y, p = labels[tags == t], probs[tags == t]
        out[t] = {**binary_metrics(y, p, threshold), "ece": expected_calibration_error(y, p)}
    return out


def clusters_of(rows: list[dict]) -> tuple[list[str], str]:
    """The bootstrap's resampling unit per crop: its source video (`group`, written by
    `pel prepare` since 2026-12-07) where every row has one, else its video."""
    if all(r.get("group") for r in rows):
        return [r["group"] for r in rows], "group"
    return [r["video"] for r in rows], "video"


def confidence(rows: list[dict], labels: np.ndarray, curves: dict[str, np.ndarray],
               default: str, resamples: int, seed: int) -> dict:
    """Bootstrap intervals (`training.confidence`) on the whole split and per dataset tag."""
    clusters, unit = clusters_of(rows)
    tags = np.array([r.get("dataset") or default for r in rows])
    out = {"unit": unit, "all": auc_intervals(labels, curves, clusters, resamples=resamples,
                                              seed=seed), "by_dataset": {}}
    for t in sorted(set(tags.tolist())):
        sel = tags == t
        ci = auc_intervals(labels[sel], {k: v[sel] for k, v in curves.items()},
                           [c for c, keep in zip(clusters, sel) if keep], resamples=resamples,
                           seed=seed)
        if ci is not None:
            out["by_dataset"][t] = ci
    return out


def write_scores(out_dir: Path, rows: list[dict], labels: np.ndarray, probs: np.ndarray,
                 threshold: float, default: str,
                 perturbed: Optional[dict[str, np.ndarray]] = None) -> tuple[Path, Path]:
    """`scores.csv` (one line per crop; a `fake_probability_<perturbation>` column per
    perturbation) and `videos.csv` (one per video: mean clean probability, verdict at the
    threshold)."""
    import csv

    perturbed = perturbed or {}
    crops_csv, videos_csv = out_dir / "scores.csv", out_dir / "videos.csv"
    with crops_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "video", "frame", "dataset", "label", "fake_probability", "verdict",
                    *(f"fake_probability_{k}" for k in perturbed)])
        for i, (r, y, p) in enumerate(zip(rows, labels, probs)):
            w.writerow([r["path"], r["video"], r.get("frame", 0), r.get("dataset") or default,
                        "fake" if y else "real", f"{p:.6f}", "fake" if p >= threshold else "real",
                        *(f"{v[i]:.6f}" for v in perturbed.values())])
    ids, vy, vp = video_level([r["video"] for r in rows], labels, probs)
    frames = {v: 0 for v in ids}
    for r in rows:
        frames[r["video"]] += 1
    with videos_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "label", "frames", "fake_probability", "verdict"])
        for v, y, p in zip(ids, vy, vp):
            w.writerow([v, "fake" if y else "real", frames[v], f"{p:.6f}",
                        "fake" if p >= threshold else "real"])
    return crops_csv, videos_csv


def evaluate(checkpoint: Optional[Path], prepared: Path, out_dir: Path, split: str = "test",
             perturbations: Optional[dict[str, float]] = None, batch_size: int = 64,
             seed: int = 0, device: str = "cpu", int8_calibration: Optional[Path] = None,
             int8_keep_float: tuple[str, ...] = (), model_cfg: Optional[ModelConfig] = None,
             input_median: Optional[bool] = None, bootstrap: int = 1000) -> dict:
    """Evaluate and write the report (see module doc); returns the report dict.
    `checkpoint=None` scores the untrained network of `model_cfg` (a chance baseline).
    `input_median` switches the input median prefilter on or off whatever the checkpoint says
    (it has no weights): what would these weights do with it."""
    model, meta = load_for_evaluation(checkpoint, model_cfg, device)
    if input_median is not None and input_median != model.cfg.input_median:
        model.cfg = model.cfg.model_copy(update={"input_median": input_median})
        log.warning("input median prefilter switched %s for this evaluation (checkpoint: %s)",
                    "on" if input_median else "off", "on" if meta.model.input_median else "off")
    size = manifest(prepared)["size"]
    if size != meta.model.input_size:
        raise ValueError(f"{prepared} holds {size}px crops, the checkpoint expects "
                         f"{meta.model.input_size}px: prepare the dataset with --size {meta.model.input_size}")
    rows = read_index(prepared, split)
    crops, labels, videos = eval_arrays(prepared, rows, seed, synthesize_fakes=False)
    if labels.min() == labels.max():
        log.warning("split %r has only %s crops: AUC and EER are undefined", split,
                    "fake" if labels[0] else "real")
    if not meta.trained:
        log.warning("evaluating an UNTRAINED network: a chance baseline, not a detector")
    t, b, thr = meta.temperature, meta.logit_bias, meta.threshold
    dataset = manifest(prepared).get("dataset", "")
    logits = predict_logits(model, crops, batch_size, device)
    probs = calibrated_probability(logits, t, b)
    report = {"checkpoint": str(checkpoint) if checkpoint else "untrained", "prepared": str(prepared),
              "split": split, "dataset": dataset, "temperature": t, "logit_bias": b, "threshold": thr,
              "calibrated": meta.calibrated, "trained": meta.trained,
              "input_median": model.cfg.input_median,
              "video_score": "mean of frame probabilities", "clean": _levels(labels, probs, videos, thr),
              "ece": expected_calibration_error(labels, probs),
              "ece_uncalibrated": expected_calibration_error(labels, sigmoid(logits)),
              "by_dataset": by_dataset(rows, labels, probs, thr, dataset), "robustness": {}}
    if labels.min() != labels.max():  # weighted to the share of fakes the probabilities mean
        prior = calibration_prior(meta)
        report["ece_at_prior"] = {"prior": prior, "ece": expected_calibration_error(
            labels, probs, prior=prior)}
    curves = {"clean": (labels, probs)}
    perturbed: dict[str, np.ndarray] = {}
    for i, (kind, strength) in enumerate((perturbations or {}).items()):
        p = calibrated_probability(predict_logits(model, perturb(crops, kind, strength, seed + i),
                                                  batch_size, device), t, b)
        res = _levels(labels, p, videos, thr)
        res["by_dataset"] = by_dataset(rows, labels, p, thr, dataset)
        report["robustness"][kind] = {"strength": strength, **res, "delta": _delta(report["clean"], res)}
        curves[f"{kind} {strength:g}"] = (labels, p)
        perturbed[kind] = p
    if bootstrap > 0 and labels.min() != labels.max():
        report["confidence"] = confidence(rows, labels, {"clean": probs, **perturbed}, dataset,
                                          bootstrap, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report["scores_csv"], report["videos_csv"] = map(str, write_scores(
        out_dir, rows, labels, probs, thr, dataset, perturbed))
    if int8_calibration is not None:
        report["int8"] = int8_cost(model.cpu(), meta, crops, labels, Path(int8_calibration), out_dir,
                                   tuple(int8_keep_float))
    if labels.min() != labels.max():
        report["roc_png"] = str(roc_plot(curves, out_dir / "roc.png"))
    report["histogram_png"] = str(score_histogram(labels, probs, thr, out_dir / "scores.png"))
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    return report
