"""Inference backends and automatic selection.

`auto` picks the fastest available for the device: TensorRT (CUDA, when installed), then PyTorch
CUDA, then ONNX Runtime on CPU (2-4x faster than PyTorch eager on CPU here). Serving a cached
ONNX export on CPU never imports PyTorch (about 650 MB of resident memory for the CUDA build):
`TorchBackend`, the exporter and the network are imported only when a backend needs them.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .base import Backend
from .onnxruntime_backend import OnnxRuntimeBackend

if TYPE_CHECKING:
    from ..pel import PEL

log = logging.getLogger(__name__)
__all__ = ["Backend", "OnnxRuntimeBackend", "TorchBackend", "create_backend", "default_device"]


def __getattr__(name: str):
    if name == "TorchBackend":  # imports torch: only on request
        from .torch_backend import TorchBackend
        return TorchBackend
    raise AttributeError(name)


def default_device() -> str:
    """"cuda" when this process can see an NVIDIA GPU, else "cpu". A machine without NVIDIA
    device nodes (or with CUDA_VISIBLE_DEVICES empty, as Ray sets it for CPU-only actors)
    answers "cpu" without importing torch."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1") or not glob.glob("/dev/nvidia[0-9]*"):
        return "cpu"
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return default_device() == "cuda"


def create_backend(model: "PEL | Callable[[], PEL]", kind: str = "auto", device: str | None = None,
                   precision: str = "fp32", onnx_path: str | Path | None = None, *,
                   compile: str = "off", trt_profile: tuple[int, int, int] | None = None,
                   calibration_dir: str | Path | None = None,
                   int8_keep_float: tuple[str, ...] = (), input_size: int | None = None,
                   threads: int | None = None) -> Backend:
    """Build a backend for `model`. `onnx_path` is where the ONNX export is cached (made if absent).

    `model` may be a loader (with `input_size` given): ONNX Runtime with a cached export then
    never builds the PyTorch network at all (less memory, faster replica start).

    `compile`: torch.compile mode of the PyTorch CUDA backend; `trt_profile`: TensorRT batch
    (min, opt, max), default the TensorRT module's; `calibration_dir`: face crops for INT8 calibration; `int8_keep_float`:
    weight-name prefixes of layers an INT8 graph keeps in float; `threads`: ONNX Runtime intra-op
    threads (see `OnnxRuntimeBackend`).
    """
    if hasattr(model, "cfg"):  # a built network (PEL)
        net, input_size = model, model.cfg.input_size
        load = lambda: net  # noqa: E731
    elif input_size is None:
        raise ValueError("create_backend needs input_size when given a model loader")
    else:
        load = functools.lru_cache(maxsize=1)(model)
    device = device or default_device()
    auto = kind == "auto"
    if auto:
        if device.startswith("cuda"):
            kind = "tensorrt" if _tensorrt_available() else "torch"
        else:
            kind = "onnxruntime"
    if kind == "tensorrt":
        from ..quantize import load_calibration_crops
        from .tensorrt_backend import DEFAULT_PROFILE, TensorRTBackend  # optional extra
        try:
            calib = (load_calibration_crops(calibration_dir, input_size)
                     if precision == "int8" and calibration_dir is not None else None)
            backend: Backend = TensorRTBackend.from_model(load(), onnx_path, device, precision,
                                                          profile=tuple(trt_profile or DEFAULT_PROFILE),
                                                          calibration_crops=calib,
                                                          keep_float=int8_keep_float)
        except (RuntimeError, ValueError) as exc:
            if not auto:
                raise
            log.exception("TensorRT backend failed (%s): falling back to PyTorch CUDA", exc)
            kind = "torch"
    if kind == "torch":
        cuda = device.startswith("cuda")
        tprec = precision if cuda else "fp32"
        if auto and tprec == "int8":  # PyTorch has no INT8 path here: the nearest fast precision
            log.warning("int8 requested without TensorRT: PyTorch CUDA runs fp16 instead")
            tprec = "fp16"
        from .torch_backend import TorchBackend
        backend = TorchBackend(load(), device, tprec, compile=compile if cuda else "off")
    elif kind == "onnxruntime":
        if onnx_path is None:
            raise ValueError("the onnxruntime backend needs an onnx_path to export to or load from")
        onnx_path = Path(onnx_path)
        if not onnx_path.exists():
            from ..export import export_onnx
            log.warning("no cached ONNX export at %s: exporting now (slow; run `pel export "
                        "--for-service` ahead to start replicas in seconds)", onnx_path)
            export_onnx(load(), onnx_path)
        if precision == "int8":
            onnx_path = _int8_graph(onnx_path, input_size, calibration_dir, int8_keep_float)
        backend = OnnxRuntimeBackend(onnx_path, input_size, device, threads=threads)
    elif kind != "tensorrt":
        raise ValueError(f"unknown backend {kind!r}: use auto, torch, onnxruntime or tensorrt")
    log.info("inference backend: %s (requested %s, device %s)", backend.describe(),
             "auto" if auto else kind, device)
    return backend


def _int8_graph(fp32_path: Path, input_size: int, calibration_dir: str | Path | None,
                keep_float: tuple[str, ...] = ()) -> Path:
    """The Q/DQ INT8 graph beside the FP32 one, quantised on first use."""
    from ..engine_cache import crops_sha256
    from ..quantize import load_calibration_crops, quantize_int8

    if calibration_dir is None:
        raise ValueError("int8 needs calibration data: set calibration_dir to a folder of face "
                         "crop images or a `pel prepare` output")
    crops = load_calibration_crops(calibration_dir, input_size)
    # Keyed by the calibration crops and float layers too: either changes the graph.
    recipe = hashlib.sha256(f"{crops_sha256(crops)}|{sorted(keep_float)}".encode()).hexdigest()
    path = fp32_path.with_name(f"{fp32_path.stem}.int8-{recipe[:12]}.onnx")
    if not path.exists():
        quantize_int8(fp32_path, path, crops, keep_float=keep_float)
    return path
