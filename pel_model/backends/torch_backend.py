"""PyTorch eager backend: CPU, or CUDA in fp32/fp16/bf16, channels-last."""
from __future__ import annotations

import numpy as np
import torch

from ..pel import PEL
from .base import Backend

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model: PEL, device: str = "cpu", precision: str = "fp32"):
        if precision not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
        if precision != "fp32" and not device.startswith("cuda"):
            raise ValueError(f"{precision} needs a CUDA device, got {device!r}")
        super().__init__(model.cfg.input_size, device, precision)
        self.model = model.eval().to(device=device, dtype=_DTYPES[precision])
        self.model = self.model.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def _run(self, crops: np.ndarray) -> np.ndarray:
        # uint8 crops travel to the device (a quarter of the bytes of float) and are normalised there.
        x = torch.from_numpy(crops)
        if self.device.startswith("cuda"):
            x = x.pin_memory().to(self.device, non_blocking=True)
        return self.model(x).float().cpu().numpy()
