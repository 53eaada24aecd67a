"""Fine-tuning controls: the starting checkpoint, frozen leading stages, the optimiser and its
learning-rate schedule.

`init_from_checkpoint` loads a trained project checkpoint into a freshly built network (strict:
same architecture, every tensor, BatchNorm statistics included).

`freeze_leading_stages` keeps the stems and the first `n` backbone stages of both streams (and
the fixed DCT input) at their ImageNet values, BatchNorm statistics included: on a CPU they are
the most expensive layers to train (largest maps) and the most generic. The schedule is a
linear warm-up followed by a cosine decay to zero over the planned steps or the time budget,
whichever runs out first (or constant).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pel_model.checkpoint import CheckpointError, CheckpointMeta, file_digest, read_meta
from pel_model.config import ModelConfig, TrainConfig
from pel_model.pel import PEL, resolve_config

# settings that leave the weights' layout unchanged (an init checkpoint may differ in them)
_NOT_ARCHITECTURE = {"pretrained", "backbone_weights", "input_median"}


def check_init_checkpoint(cfg: ModelConfig, path) -> CheckpointMeta:
    """The checkpoint's metadata; CheckpointError unless it holds the network `cfg` builds."""
    meta = read_meta(path)
    ours = resolve_config(cfg).model_dump(exclude=_NOT_ARCHITECTURE)
    theirs = meta.model.model_dump(exclude=_NOT_ARCHITECTURE)
    if ours != theirs:
        diff = {k: (theirs.get(k), v) for k, v in ours.items() if v != theirs.get(k)}
        raise CheckpointError(f"init_checkpoint {path} holds another network than the recipe's "
                              f"model (checkpoint vs recipe: {diff})")
    return meta


def init_from_checkpoint(model: PEL, path) -> str:
    """Copy the weights of the checkpoint at `path` into `model` (strict); returns a provenance
    line."""
    from safetensors.torch import load_file

    meta = check_init_checkpoint(model.cfg, path)
    model.load_state_dict(load_file(str(path)))
    state = "trained" if meta.trained else "untrained"
    return f"checkpoint {path} (sha256 {file_digest(path)}, {state})"


def frozen_modules(model: PEL, n: int) -> list[nn.Module]:
    stages = len(model.rgb.blocks)
    if n > stages:
        raise ValueError(f"frozen_stages={n} but {model.cfg.backbone} has {stages} stages")
    out: list[nn.Module] = [model.freq_input]
    for stream in (model.rgb, model.freq):
        out += [stream.conv_stem, stream.bn1] if n else []
        out += [stream.blocks[i] for i in range(n)]
    return out


def freeze_leading_stages(model: PEL, n: int) -> list[nn.Module]:
    """Freeze (see module doc); returns the frozen modules, to be kept in eval mode."""
    mods = frozen_modules(model, n)
    for m in mods:
        for p in m.parameters():
            p.requires_grad_(False)
    return mods


def keep_frozen_in_eval(mods: list[nn.Module]) -> None:
    """Call after `model.train()`: frozen BatchNorm layers keep their running statistics."""
    for m in mods:
        m.eval()


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, warmup: int, schedule: str, time_fraction: float = 0.0) -> float:
    """Multiplier of the base learning rate at `step` (0-based) of `total` planned steps. With a
    time budget, `time_fraction` (the share of it spent) advances the decay when it is ahead of
    the steps, so the schedule ends when the budget does."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    done = max((step - warmup) / max(1, total - warmup), time_fraction)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))


def set_lr(opt: torch.optim.Optimizer, cfg: TrainConfig, step: int, total: int,
           time_fraction: float = 0.0) -> float:
    lr = cfg.lr * lr_factor(step, total, cfg.warmup_steps, cfg.lr_schedule, time_fraction)
    for group in opt.param_groups:
        group["lr"] = lr
    return lr
