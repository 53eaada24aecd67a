"""Mutual enhancement (PEL, Gu et al., AAAI 2022, Sec. 3.3).

The two streams share one spatial attention module: `A = sigmoid(pw_conv(cat(f_rgb, f_freq)))`
gives one map per stream, and each stream is refined as `f_s + dwconv1x1(f_s * a_s)`. The
depthwise convs start at zero (identity at initialisation).
"""
from __future__ import annotations

import torch
from torch import nn


class MutualEnhancement(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.attention = nn.Conv2d(2 * channels, 2, 1)
        self.dw_rgb = nn.Conv2d(channels, channels, 1, groups=channels)
        self.dw_freq = nn.Conv2d(channels, channels, 1, groups=channels)
        for conv in (self.dw_rgb, self.dw_freq):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, f_rgb: torch.Tensor, f_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.sigmoid(self.attention(torch.cat((f_rgb, f_freq), dim=1)))
        return (f_rgb + self.dw_rgb(f_rgb * a[:, :1]),
                f_freq + self.dw_freq(f_freq * a[:, 1:]))
