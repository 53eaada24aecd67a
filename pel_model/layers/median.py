"""3x3 median filter as a min/max sorting network.

`torch.median` exports to neither ONNX exporter; the 19-exchange median-of-9 network (Paeth,
Graphics Gems, 1990) over the 9 shifted views is bit-exact and exports as Min/Max nodes.
Borders are replicate-padded, so the output has the input's size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Compare-exchange pairs (lo, hi); afterwards element 4 holds the median of the 9.
_MEDIAN9 = (
    (1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8),
    (0, 3), (5, 8), (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2),
)


def median3x3(x: torch.Tensor) -> torch.Tensor:
    """Per-channel 3x3 median of (N, C, H, W), replicate padding at the borders."""
    h, w = x.shape[-2:]
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    v = [p[..., i:i + h, j:j + w] for i in range(3) for j in range(3)]
    for a, b in _MEDIAN9:
        v[a], v[b] = torch.minimum(v[a], v[b]), torch.maximum(v[a], v[b])
    return v[4]
