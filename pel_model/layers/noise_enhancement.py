"""Noise enhancement (PEL self-enhancement, Gu et al., AAAI 2022, Sec. 3.2).

`f + dwconv1x1(sigmoid(f - median3x3(f)))`: the high-frequency residual left by a median filter
highlights blending and up-sampling noise. The depthwise 1x1 conv starts at zero, so the module
is the identity at initialisation and the pretrained backbone is undisturbed.
"""
from __future__ import annotations

import torch
from torch import nn

from .median import median3x3


class NoiseEnhancement(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 1, groups=channels)
        nn.init.zeros_(self.dwconv.weight)
        nn.init.zeros_(self.dwconv.bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f + self.dwconv(torch.sigmoid(f - median3x3(f)))
