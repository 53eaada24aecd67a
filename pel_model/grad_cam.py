"""Grad-CAM explanation maps (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep
Networks via Gradient-based Localization", ICCV 2017).

For a target layer with activations A (C x h x w), the map is ReLU(sum_c alpha_c A_c) with
alpha_c the spatial mean of d logit / d A_c, upsampled to the input and scaled to [0, 1]. For
PEL the layers are the last feature maps of both streams (`rgb.bn2`, `freq.bn2`: what the head
pools), so the maps say where in the face each stream found the evidence for "fake";
`combined` is their mean.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def grad_cam(model: nn.Module, layers: dict[str, nn.Module], inputs: torch.Tensor,
             size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """{name: (N, H, W) maps in [0, 1]} for the sum of `model(inputs)`'s logits."""
    acts: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_module, _inp, out):
            out.retain_grad()
            acts[name] = out
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    try:
        with torch.enable_grad():
            model.zero_grad(set_to_none=True)
            logits = model(inputs)
            logits.sum().backward()
        model.zero_grad(set_to_none=True)  # the parameters' gradients are not needed
    finally:
        for h in handles:
            h.remove()
    maps = {}
    for name, a in acts.items():
        weights = a.grad.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * a).sum(1, keepdim=True)).detach()
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
        peak = cam.flatten(1).max(1).values.clamp_min(1e-12)
        maps[name] = cam / peak[:, None, None]
    return maps


def pel_heatmaps(model: nn.Module, crops: np.ndarray) -> dict[str, np.ndarray]:
    """Grad-CAM of a PEL network on uint8 crops (N, S, S, 3): `rgb`, `frequency`, `combined`,
    each (N, S, S) float32 in [0, 1]."""
    size = crops.shape[1:3]
    maps = grad_cam(model.eval(), {"rgb": model.rgb.bn2, "frequency": model.freq.bn2},
                    torch.from_numpy(np.ascontiguousarray(crops)), size)
    out = {k: v.numpy().astype(np.float32) for k, v in maps.items()}
    out["combined"] = (out["rgb"] + out["frequency"]) / 2
    return out


def _colormap(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB float (blue, cyan, yellow, red): a jet-like ramp."""
    v = np.clip(values, 0, 1)[..., None]
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.concatenate([r, g, b], axis=-1)


def overlay(crop: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The face with the heatmap blended over it: uint8 (S, S, 3)."""
    mixed = (1 - alpha) * crop.astype(np.float32) / 255 + alpha * _colormap(heatmap)
    return (np.clip(mixed, 0, 1) * 255).round().astype(np.uint8)
