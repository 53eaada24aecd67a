"""ONNX Runtime backend (CPU, or CUDA when onnxruntime-gpu is installed).

`threads=None` lets ONNX Runtime use every core (benchmarks, a machine of its own); a replica
passes its CPU budget instead, and then the pool's idle threads sleep rather than spin.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..export import INPUT_NAME
from .base import Backend


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, input_size: int, device: str = "cpu",
                 threads: int | None = None):
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or int(os.environ.get("PEL_ORT_THREADS", 0))
        if threads:  # a budget shared with other work: idle pool threads sleep, not spin
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.inter_op_num_threads = 1
        if providers[0] == "CPUExecutionProvider":
            # Memory patterns pre-plan one buffer per batch shape: no faster here, and they
            # nearly double resident memory (docs/benchmarks.md, "Memory").
            opts.enable_mem_pattern = False
        self.session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=providers)
        name = Path(onnx_path).name
        precision = "int8" if "int8" in name else "fp16" if "fp16" in name else "fp32"
        super().__init__(input_size, "cuda" if providers[0].startswith("CUDA") else "cpu", precision)

    def _run(self, crops: np.ndarray) -> np.ndarray:
        return self.session.run(None, {INPUT_NAME: crops})[0]
