"""Fine-grained frequency decomposition (PEL, Gu et al., AAAI 2022, Eq. 1).

Each colour channel of a YCbCr image is transformed by an orthonormal 8x8 DCT-II over a sliding
window with stride 2; the 64 coefficients of each of the 3 channels become 192 channels that keep
the patch position. The transform is a fixed-weight grouped convolution (exportable, fast); padding
3 makes the map exactly H/2 x W/2. Coefficient `u * 8 + v` of channel `c` is output channel
`c * 64 + u * 8 + v`, with `u` the vertical and `v` the horizontal frequency, as
`scipy.fft.dctn(patch, norm="ortho")[u, v]`.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

# JPEG (ITU-T T.871) full-range RGB -> YCbCr, on 0-255 values.
_YCBCR = torch.tensor(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
)
_YCBCR_OFFSET = torch.tensor([0.0, 128.0, 128.0])


def rgb_to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 255] -> YCbCr in [0, 255] (JPEG convention)."""
    m = _YCBCR.to(rgb.device, rgb.dtype)
    off = _YCBCR_OFFSET.to(rgb.device, rgb.dtype)
    return torch.einsum("ij,njhw->nihw", m, rgb) + off.view(1, 3, 1, 1)


def dct_matrix(n: int = 8) -> torch.Tensor:
    """Orthonormal DCT-II matrix D with D[u, i] = a(u) cos(pi (2i + 1) u / 2n)."""
    i = torch.arange(n, dtype=torch.float64)
    u = i.view(-1, 1)
    d = torch.cos(math.pi * (2 * i + 1) * u / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


class SlidingDCT(nn.Module):
    """Sliding-window 2-D DCT as a fixed grouped convolution: (N, C, H, W) -> (N, 64 C, H/2, W/2)."""

    def __init__(self, in_channels: int = 3, block: int = 8, stride: int = 2):
        super().__init__()
        d = dct_matrix(block)
        basis = torch.einsum("ui,vj->uvij", d, d).reshape(block * block, 1, block, block)
        self.register_buffer("weight", basis.repeat(in_channels, 1, 1, 1).float(), persistent=False)
        self.in_channels, self.block, self.stride = in_channels, block, stride
        self.padding = (block - stride) // 2

    @property
    def out_channels(self) -> int:
        return self.in_channels * self.block * self.block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.to(x.dtype), stride=self.stride, padding=self.padding,
                        groups=self.in_channels)


class FrequencyInput(nn.Module):
    """RGB (0-255) -> YCbCr -> sliding DCT (192 ch) -> learnable 1x1 conv (64 ch), at H/2 x W/2."""

    def __init__(self, out_channels: int = 64):
        super().__init__()
        self.dct = SlidingDCT(3)
        self.reduce = nn.Conv2d(self.dct.out_channels, out_channels, 1, bias=False)

    def forward(self, rgb255: torch.Tensor) -> torch.Tensor:
        # Scale coefficients to O(1) so the learnable 1x1 conv trains at a normal learning rate.
        return self.reduce(self.dct(rgb_to_ycbcr(rgb255)) / 255.0)
