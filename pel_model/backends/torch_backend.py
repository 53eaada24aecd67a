"""PyTorch eager backend: CPU, or CUDA in fp32/fp16/bf16, channels-last.

On CUDA: weights in the chosen precision and channels-last (tensor-core friendly convolutions),
cuDNN autotuning, TF32 for fp32 matmuls/convolutions, uint8 crops pinned and copied on a side
stream (a quarter of the bytes of float; normalised on the GPU inside the model), so a copy for
one batch overlaps the compute of another when batches come from several threads. Optional
`torch.compile` (its "reduce-overhead" mode replays CUDA graphs).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from ..pel import PEL
from .base import Backend

log = logging.getLogger(__name__)
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model: PEL, device: str = "cpu", precision: str = "fp32",
                 compile: str = "off", tf32: bool = True):
        if precision not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
        if precision != "fp32" and not device.startswith("cuda"):
            raise ValueError(f"{precision} needs a CUDA device, got {device!r}")
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
        super().__init__(model.cfg.input_size, device, precision)
        self.compile = compile
        self.model = model.eval().to(device=device, dtype=_DTYPES[precision])
        self.model = self.model.to(memory_format=torch.channels_last)
        self._cuda = device.startswith("cuda")
        if self._cuda:
            torch.backends.cudnn.benchmark = True  # batch shapes repeat: tune once per shape
            if tf32:
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
            self._copy_stream = torch.cuda.Stream(device)
        self._forward = self.model
        if compile != "off":
            self._forward = torch.compile(self.model, mode=None if compile == "default" else compile,
                                          dynamic=False)
            log.info("torch.compile(mode=%s): the first batch of each size compiles", compile)

    def describe(self) -> str:
        suffix = "" if self.compile == "off" else f"+compile-{self.compile}"
        return f"{super().describe()}{suffix}"

    @torch.inference_mode()
    def _run(self, crops: np.ndarray) -> np.ndarray:
        # Crops that Ray deserialised zero-copy are read-only; torch.from_numpy warns on those.
        x = torch.from_numpy(crops if crops.flags.writeable else crops.copy())
        if not self._cuda:
            return self._forward(x).float().numpy()
        # uint8 crops travel to the device (a quarter of the bytes of float) and are normalised there.
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            x = x.pin_memory().to(self.device, non_blocking=True)
        compute.wait_stream(self._copy_stream)
        x.record_stream(compute)  # the allocator must not reuse x before the compute stream is done
        out = self._forward(x)
        if self.compile == "reduce-overhead":
            out = out.clone()  # CUDA-graph outputs are overwritten by the next replay
        return out.float().cpu().numpy()
