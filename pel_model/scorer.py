"""From a configured checkpoint to calibrated fake probabilities.

`Scorer` wraps a backend with the checkpoint's calibration: `p = sigmoid(logit / T + b)` and the
decision threshold. A model that was never trained or never calibrated is reported loudly here
and carried in `warnings`, which the service copies into every verdict.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np
from scipy.special import expit

from .backends import Backend, create_backend, default_device
from .checkpoint import CheckpointMeta, file_digest, load_checkpoint, read_meta
from .config import DEFAULT_CHECKPOINT, DetectorConfig, ModelConfig
from .export import GRAPH_VERSION

log = logging.getLogger(__name__)


def calibrated_probability(logits: np.ndarray, temperature: float = 1.0,
                           bias: float = 0.0) -> np.ndarray:
    """`sigmoid(logit / T + b)` in float64: the one logit-to-probability map of training and
    serving (T and b from `pel calibrate`; b = 0 for temperature scaling)."""
    return expit(np.asarray(logits, np.float64) / temperature + bias)


@dataclass
class Scorer:
    backend: Backend
    meta: CheckpointMeta
    threshold: float
    model_id: str
    warnings: list[str] = field(default_factory=list)

    @property
    def input_size(self) -> int:
        return self.backend.input_size

    def probabilities(self, crops: np.ndarray) -> np.ndarray:
        return calibrated_probability(self.backend.logits(crops), self.meta.temperature,
                                      self.meta.logit_bias).astype(np.float32)


def onnx_artifact(cfg: DetectorConfig, checkpoint_digest: str | None = None) -> Path:
    """Where the service caches the ONNX export of the configured model (TensorRT engines go to
    `tensorrt/` beside it): keyed by the checkpoint's digest (pass it when already known), or
    for an untrained model by its config and library versions, and by the exported graph's version."""
    artifacts = Path(cfg.artifacts_dir).expanduser()
    if cfg.checkpoint is not None:
        digest = checkpoint_digest or file_digest(cfg.checkpoint)
        return artifacts / f"pel-{digest}-g{GRAPH_VERSION}.onnx"
    key = f"{cfg.model.model_dump_json()}|{version('torch')}|{version('timm')}|g{GRAPH_VERSION}"
    return artifacts / f"pel-untrained-{hashlib.sha256(key.encode()).hexdigest()[:12]}.onnx"


def cpu_threads(cfg: DetectorConfig) -> int:
    """The CPU profile's thread rule: each of a replica's `cpu_runs` concurrent model calls gets
    an equal share of its CPU budget (`detector.threads`, else `num_cpus / cpu_runs` rounded up,
    at least one thread), never every core of the node, so inference does not fight the stream
    workers' decode and face-detection threads."""
    return cfg.threads or max(1, math.ceil(cfg.num_cpus / cfg.cpu_runs - 1e-9))


def untrained_network(model: ModelConfig):
    """The untrained network of `model`, with deterministic random weights."""
    import torch

    from .pel import PEL

    torch.manual_seed(0)
    return PEL(model, load_pretrained=False)


def resolved_config(model: ModelConfig) -> ModelConfig:
    """`model` with its normalisation resolved as the network would (without building it)."""
    from .pel import resolve_config
    return resolve_config(model)


def load_scorer(cfg: DetectorConfig, device: str | None = None) -> Scorer:
    """Load the configured checkpoint (or an untrained model, loudly) on the best backend."""
    if cfg.checkpoint is not None:
        if Path(cfg.checkpoint) == DEFAULT_CHECKPOINT and not DEFAULT_CHECKPOINT.is_file():
            raise FileNotFoundError(
                f"the default model {DEFAULT_CHECKPOINT} is not part of this installation: it "
                "ships in the repository (install from a clone: pip install -e .), or set "
                "detector.checkpoint to a trained checkpoint (or null for the untrained network)")
        meta = read_meta(cfg.checkpoint)  # a clear error when it is missing
        path = cfg.checkpoint
        model = lambda: load_checkpoint(path)[0]  # noqa: E731  (built only if a backend needs it)
        tag = file_digest(cfg.checkpoint)
    else:
        model = lambda: untrained_network(cfg.model)  # noqa: E731
        meta, tag = CheckpointMeta(model=resolved_config(cfg.model)), "untrained"
    onnx_path = onnx_artifact(cfg, tag if cfg.checkpoint is not None else None)
    warnings = []
    if not meta.trained:
        warnings.append("model was never trained: its scores are meaningless")
    elif not meta.calibrated:
        warnings.append("model was never calibrated: probabilities and threshold are uncalibrated")
    for w in warnings:
        log.warning("PEL MODEL WARNING: %s (checkpoint: %s)", w, cfg.checkpoint or "none configured")
    device = device or default_device()
    backend = create_backend(model, cfg.backend, device, cfg.precision, onnx_path,
                             compile=cfg.compile, trt_profile=cfg.tensorrt_profile,
                             calibration_dir=cfg.calibration_dir,
                             int8_keep_float=cfg.int8_keep_float,
                             input_size=meta.model.input_size,
                             threads=cpu_threads(cfg) if device == "cpu" else None)
    threshold = cfg.threshold if cfg.threshold is not None else meta.threshold
    m = meta.model
    model_id = f"pel-{m.backbone}-{m.input_size}@{tag}+{backend.describe()}"  # a metrics label: no "/"
    return Scorer(backend, meta, threshold, model_id, warnings)
