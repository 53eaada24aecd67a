"""Channel attention (PEL self-enhancement, Gu et al., AAAI 2022, Sec. 3.2; after CBAM).

`f + f * sigmoid(MLP(GAP(f) + GMP(f)))` with a shared two-layer MLP of reduction `r`
(at least 8 hidden units).
"""
from __future__ import annotations

import torch
from torch import nn


class ChannelAttention(nn.Module):
    def __init__(self, channels: int, reduction: int = 16, min_hidden: int = 8):
        super().__init__()
        hidden = max(channels // reduction, min_hidden)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1)
        )

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        pooled = f.mean((2, 3), keepdim=True) + f.amax((2, 3), keepdim=True)
        return f + f * torch.sigmoid(self.mlp(pooled))
