"""Checkpoints: safetensors weights plus JSON metadata in the file's header.

Metadata: format version, architecture config (`ModelConfig`, incl. input size and normalisation),
calibration (temperature, logit bias, decision threshold), whether the model was trained and calibrated, and
provenance (data, recipe, metrics, code version). Loading never unpickles anything.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from .config import ModelConfig

if TYPE_CHECKING:  # reading metadata (all that ONNX serving needs) imports no torch
    import torch

    from .pel import PEL

FORMAT_VERSION = 1
_KEY = "pel"


class CheckpointError(ValueError):
    """A checkpoint that is unreadable, of an unknown version, or does not match its config."""


@dataclass
class CheckpointMeta:
    model: ModelConfig = field(default_factory=ModelConfig)
    temperature: float = 1.0
    logit_bias: float = 0.0
    threshold: float = 0.5
    trained: bool = False
    calibrated: bool = False
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d["model"] = self.model.model_dump(mode="json")
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CheckpointMeta":
        d = json.loads(text)
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"unsupported checkpoint format version {version!r} "
                                  f"(this code reads version {FORMAT_VERSION})")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:  # e.g. a calibration term this code would silently ignore
            raise CheckpointError(f"checkpoint metadata has fields this code does not know: "
                                  f"{sorted(unknown)} (written by a newer pel-moderation?)")
        d["model"] = ModelConfig.model_validate(d["model"])
        return cls(**d)


def save_checkpoint(path: str | Path, model: "PEL", meta: CheckpointMeta) -> Path:
    from safetensors.torch import save_file

    from .pel import resolve_config

    path = Path(path)
    if resolve_config(meta.model) != model.cfg:
        raise CheckpointError("metadata model config differs from the model's own config")
    meta = replace(meta, model=model.cfg)  # with the normalisation the model really uses
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata={_KEY: meta.to_json()})
    tmp.replace(path)
    return path


def read_meta(path: str | Path) -> CheckpointMeta:
    try:
        with safe_open(str(path), framework="numpy") as f:
            raw = (f.metadata() or {}).get(_KEY)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as exc:
        raise CheckpointError(f"not a safetensors checkpoint: {path} ({exc})") from exc
    if raw is None:
        raise CheckpointError(f"{path} has no PEL metadata (was it written by save_checkpoint?)")
    return CheckpointMeta.from_json(raw)


def load_checkpoint(path: str | Path, device: "str | torch.device" = "cpu") -> "tuple[PEL, CheckpointMeta]":
    from safetensors.torch import load_file

    from .pel import PEL

    meta = read_meta(path)
    model = PEL(meta.model, load_pretrained=False)
    state = load_file(str(path), device=str(device))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"checkpoint {path} does not match its config ({meta.model.backbone}, "
            f"{meta.model.input_size}px): {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}, shape mismatch in {sorted(wrong)[:3]}"
        )
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def file_digest(path: str | Path, n: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]
