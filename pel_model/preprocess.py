"""The input contract and the one normalisation used by training and serving alike.

Input: a batch of uint8 RGB face crops, (N, S, S, 3), S = the model's input size (as produced by
`pel_model.faces.crop_face`). The RGB stream sees `(x / 255 - mean) / std`; the frequency stream
sees the raw 0-255 values (converted to YCbCr inside the network).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

if TYPE_CHECKING:  # torch stays unimported where only the contract is checked (ONNX serving)
    import torch


def validate_crops(crops: "torch.Tensor | np.ndarray", input_size: int) -> None:
    """Raise a clear ValueError unless `crops` is uint8 (N, input_size, input_size, 3) with N >= 1."""
    dtype = crops.dtype
    if str(dtype) not in ("uint8", "torch.uint8"):
        raise ValueError(f"face crops must be uint8 RGB, got dtype {dtype}")
    shape = tuple(crops.shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"face crops must have shape (N, H, W, 3), got {shape}")
    if shape[0] < 1:
        raise ValueError("empty batch of face crops")
    if shape[1] != input_size or shape[2] != input_size:
        raise ValueError(
            f"face crops must be {input_size}x{input_size} (the model's input size), got {shape[1]}x{shape[2]}"
        )


def normalize(crops: "torch.Tensor", mean: Sequence[float], std: Sequence[float],
              dtype: "torch.dtype | None" = None,
              prefilter: "Callable[[torch.Tensor], torch.Tensor] | None" = None,
              ) -> "tuple[torch.Tensor, torch.Tensor]":
    """uint8 (N, S, S, 3) -> (normalised RGB, RGB in 0-255), both (N, 3, S, S) channels-last;
    `prefilter` (e.g. the input median) runs once on the 0-255 values, before normalising."""
    import torch

    dtype = dtype or torch.float32
    rgb255 = crops.permute(0, 3, 1, 2).to(dtype)
    if prefilter is not None:
        rgb255 = prefilter(rgb255)
    m = torch.tensor(mean, dtype=dtype, device=crops.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=dtype, device=crops.device).view(1, 3, 1, 1)
    return (rgb255 / 255.0 - m) / s, rgb255
