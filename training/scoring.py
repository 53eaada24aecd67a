"""Batched logits of a PEL model over uint8 crops (validation, calibration, evaluation)."""
from __future__ import annotations

import numpy as np
import torch

from pel_model.pel import PEL
from pel_model.preprocess import validate_crops
from pel_model.scorer import calibrated_probability


@torch.no_grad()
def predict_logits(model: PEL, crops: np.ndarray, batch_size: int = 64,
                   device: str | torch.device = "cpu", amp: bool = False) -> np.ndarray:
    """Logits (N,) float64 for uint8 crops (N, S, S, 3); the model is put in eval mode."""
    if len(crops):
        validate_crops(crops, model.cfg.input_size)
    was_training = model.training
    model.eval()
    out = []
    device = torch.device(device)
    try:
        for i in range(0, len(crops), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(crops[i:i + batch_size])).to(device)
            with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
                out.append(model(x).float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return calibrated_probability(x)
