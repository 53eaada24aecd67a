"""The PEL network (Gu et al., "Exploiting Fine-grained Face Forgery Clues via Progressive
Enhancement Learning", AAAI 2022).

Optionally (`input_median`) a 3x3 median filters the input crop ahead of both streams, an
input-denoising prefilter against impulse noise (not in the paper).

Two streams share one backbone architecture (timm EfficientNet, B4 by default):
- RGB stream: the backbone as is.
- Frequency stream: `FrequencyInput` (YCbCr, sliding 8x8 DCT with stride 2, 192 -> 64 ch at
  H/2) feeds a stride-1 copy of the stem conv, so both streams have the same spatial size after
  every block without resampling.

"Blocks" are the backbone's stages (`backbone.blocks`, 7 for EfficientNet). After stage i:
noise enhancement if i in `noise_stages` (default 0, 1: the first two), channel attention if i in
`attention_stages`, then mutual enhancement if i in `mutual_stages` (default 1..5: the second to
the penultimate). Head: conv head of each stream, global average pooling, concatenation,
dropout, one logit (trained with binary cross-entropy; `sigmoid(logit)` is the fake probability).
"""
from __future__ import annotations

import logging
from typing import Optional

import timm
import torch
from torch import nn

from .config import ModelConfig
from .layers import ChannelAttention, FrequencyInput, MutualEnhancement, NoiseEnhancement
from .layers.median import median3x3
from .preprocess import normalize, validate_crops
from .weights import BackboneWeights, load_strict, pretrained_normalization, resolve_backbone_weights

log = logging.getLogger(__name__)


def _backbone(cfg: ModelConfig, weights: Optional[BackboneWeights]) -> nn.Module:
    net = timm.create_model(cfg.backbone, pretrained=False, num_classes=0)
    if not hasattr(net, "blocks") or not hasattr(net, "conv_stem"):
        raise ValueError(f"backbone {cfg.backbone!r} is not an EfficientNet-style timm model")
    if weights is not None:
        load_strict(net, weights.state, f"{cfg.backbone} weights from {weights.source}")
    return net


def resolve_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with the RGB normalisation filled in from the backbone's pretrained configuration
    (kept where given), so a checkpoint always records the values it was trained with."""
    if cfg.rgb_mean is not None and cfg.rgb_std is not None:
        return cfg
    mean, std = pretrained_normalization(cfg.backbone)
    return cfg.model_copy(update={"rgb_mean": cfg.rgb_mean or mean, "rgb_std": cfg.rgb_std or std})


def _stage_channels(net: nn.Module) -> list[int]:
    return [stage[-1].conv_pwl.out_channels if hasattr(stage[-1], "conv_pwl")
            else stage[-1].conv_pw.out_channels for stage in net.blocks]


class PEL(nn.Module):
    """uint8 RGB face crops (N, S, S, 3) -> fake logits (N,)."""

    def __init__(self, cfg: ModelConfig = ModelConfig(), load_pretrained: bool = True):
        super().__init__()
        self.cfg = cfg = resolve_config(cfg)
        weights = None
        if load_pretrained and (cfg.pretrained or cfg.backbone_weights is not None):
            weights = resolve_backbone_weights(cfg.backbone, cfg.backbone_weights)
        # "file:...", "package:...", "hub:..." or "random" (what training started from)
        self.weights_source = weights.source if weights is not None else "random"
        # Both streams start from the same ImageNet weights where shapes allow: every stage
        # and the head (pretrained filters train faster than random ones, whatever the input);
        # the frequency stream's stem takes 64 DCT channels, so it is new.
        self.rgb = _backbone(cfg, weights)
        self.freq = _backbone(cfg, weights)
        stem = self.rgb.conv_stem
        self.freq_input = FrequencyInput(cfg.dct_channels)
        self.freq.conv_stem = nn.Conv2d(cfg.dct_channels, stem.out_channels, stem.kernel_size,
                                        stride=1, padding=stem.kernel_size[0] // 2, bias=False)
        channels = _stage_channels(self.rgb)
        n = len(channels)
        for name in ("noise_stages", "attention_stages", "mutual_stages"):
            bad = [s for s in getattr(cfg, name) if s >= n]
            if bad:
                raise ValueError(f"{name} {bad} out of range: {cfg.backbone} has {n} stages")
        self.noise_rgb = nn.ModuleDict({str(i): NoiseEnhancement(channels[i]) for i in cfg.noise_stages})
        self.noise_freq = nn.ModuleDict({str(i): NoiseEnhancement(channels[i]) for i in cfg.noise_stages})
        r = cfg.attention_reduction
        self.attn_rgb = nn.ModuleDict({str(i): ChannelAttention(channels[i], r) for i in cfg.attention_stages})
        self.attn_freq = nn.ModuleDict({str(i): ChannelAttention(channels[i], r) for i in cfg.attention_stages})
        self.mutual = nn.ModuleDict({str(i): MutualEnhancement(channels[i]) for i in cfg.mutual_stages})
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(2 * self.rgb.num_features, 1)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        validate_crops(crops, self.cfg.input_size)
        x_rgb, rgb255 = normalize(crops, self.cfg.rgb_mean, self.cfg.rgb_std,
                                  dtype=self.fc.weight.dtype,
                                  prefilter=median3x3 if self.cfg.input_median else None)
        fr = self.rgb.bn1(self.rgb.conv_stem(x_rgb))
        ff = self.freq.bn1(self.freq.conv_stem(self.freq_input(rgb255)))
        for i, (stage_rgb, stage_freq) in enumerate(zip(self.rgb.blocks, self.freq.blocks)):
            fr, ff = stage_rgb(fr), stage_freq(ff)
            key = str(i)
            if key in self.noise_rgb:
                fr, ff = self.noise_rgb[key](fr), self.noise_freq[key](ff)
            if key in self.attn_rgb:
                fr, ff = self.attn_rgb[key](fr), self.attn_freq[key](ff)
            if key in self.mutual:
                fr, ff = self.mutual[key](fr, ff)
        fr = self.rgb.bn2(self.rgb.conv_head(fr)).mean((2, 3))
        ff = self.freq.bn2(self.freq.conv_head(ff)).mean((2, 3))
        return self.fc(self.dropout(torch.cat((fr, ff), dim=1))).squeeze(1)


def create_pel(cfg: ModelConfig | None = None, load_pretrained: bool = True, **overrides) -> PEL:
    """Model builder: `create_pel(backbone="efficientnet_b0", input_size=224, pretrained=False)`."""
    cfg = ModelConfig.model_validate({**(cfg or ModelConfig()).model_dump(), **overrides})
    return PEL(cfg, load_pretrained=load_pretrained)
