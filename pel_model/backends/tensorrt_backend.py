"""TensorRT backend (optional extra: `pip install 'pel-moderation[trt]'`), TensorRT 10 and 11.

Precision comes from the graph (TensorRT 11 builds strongly typed networks only): FP32 = the
exported graph, FP16 = `convert_fp16`, INT8 = Q/DQ nodes from `quantize_int8(target="tensorrt")`.
Networks are created STRONGLY_TYPED where the flag exists; older builds fall back to the FP16/INT8
builder flags. Engines are cached under a key of everything they depend on (`engine_cache`) and
built ahead (`pel export --trt`) or at replica start when missing, with a shared timing cache.
Inference runs on torch CUDA tensors; each concurrent batch takes an execution context from a
small pool, on its own CUDA stream.
"""
from __future__ import annotations

import logging
import os
import queue
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine_cache import EngineKey, crops_sha256, file_sha256, validate_profile
from ..export import INPUT_NAME, OUTPUT_NAME, export_onnx
from ..pel import PEL
from .base import Backend

log = logging.getLogger(__name__)
DEFAULT_PROFILE = (1, 16, 64)
CALIBRATION_ENV = "PEL_CALIBRATION_DIR"


def import_tensorrt() -> Any:
    """`import tensorrt`, or an ImportError that says how to get it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ImportError("the TensorRT backend needs the optional extra: "
                          "pip install 'pel-moderation[trt]' (an NVIDIA GPU and driver too)") from exc
    return trt


def _cuda_device(device: str) -> torch.device:
    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT needs a CUDA GPU and none is available")
    dev = torch.device(device if device.startswith("cuda") else "cuda")
    if dev.type != "cuda":
        raise ValueError(f"TensorRT runs on CUDA devices only, got {device!r}")
    return dev


def _graph_for_precision(onnx_path: Path, precision: str, out_dir: Path,
                         calibration_crops: np.ndarray | None, tag: str,
                         keep_float: tuple[str, ...] = ()) -> Path:
    """The ONNX graph that carries `precision`, with the uint8 Cast before the Transpose."""
    from ..quantize import cast_input_first, convert_fp16, quantize_int8

    out_dir.mkdir(parents=True, exist_ok=True)
    base = cast_input_first(onnx_path, out_dir / f"{tag}.fp32.onnx")
    if precision == "fp32":
        return base
    if precision == "fp16":
        return convert_fp16(base, out_dir / f"{tag}.fp16.onnx")
    assert calibration_crops is not None
    return quantize_int8(base, out_dir / f"{tag}.int8-qdq.onnx", calibration_crops, target="tensorrt",
                         keep_float=keep_float)


def _calibration_or_env(calibration_crops: np.ndarray | None, input_size: int) -> np.ndarray:
    if calibration_crops is not None:
        return calibration_crops
    folder = os.environ.get(CALIBRATION_ENV)
    if not folder:
        raise ValueError("INT8 needs calibration data: pass calibration_crops (uint8 real face crops) "
                         f"or set {CALIBRATION_ENV} to a folder of face crop images")
    from ..quantize import load_calibration_crops
    return load_calibration_crops(folder, input_size)


def engine_key(onnx_path: str | Path, input_size: int, precision: str,
               profile: tuple[int, int, int] = DEFAULT_PROFILE, device: str = "cuda",
               calibration_crops: np.ndarray | None = None,
               keep_float: tuple[str, ...] = ()) -> EngineKey:
    """The cache key of the engine for this graph on this machine (needs TensorRT and a GPU)."""
    trt = import_tensorrt()
    dev = _cuda_device(device)
    return EngineKey(file_sha256(onnx_path), precision, input_size, validate_profile(tuple(profile)),
                     trt.__version__, torch.cuda.get_device_capability(dev),
                     calibration_sha256=crops_sha256(calibration_crops)
                     if precision == "int8" else None,
                     float_layers=tuple(sorted(keep_float)) if precision == "int8" else ())


def build_engine(onnx_path: str | Path, input_size: int, precision: str = "fp16",
                 cache_dir: str | Path | None = None,
                 profile: tuple[int, int, int] = DEFAULT_PROFILE,
                 calibration_crops: np.ndarray | None = None, workspace_gib: float = 4.0,
                 device: str = "cuda", keep_float: tuple[str, ...] = ()) -> Path:
    """Build (or find in the cache) the engine for the FP32 ONNX graph at `onnx_path`.

    Returns the engine's path under `cache_dir` (default: `<onnx dir>/tensorrt`).
    """
    trt = import_tensorrt()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model {onnx_path} does not exist: run `pel export` first")
    if precision == "int8":
        calibration_crops = _calibration_or_env(calibration_crops, input_size)
    key = engine_key(onnx_path, input_size, precision, profile, device, calibration_crops, keep_float)
    cache = Path(cache_dir) if cache_dir is not None else onnx_path.parent / "tensorrt"
    cache.mkdir(parents=True, exist_ok=True)
    engine_path = cache / key.engine_name()
    if engine_path.is_file():
        log.info("TensorRT engine found in cache: %s", engine_path)
        return engine_path
    start = time.perf_counter()
    with torch.cuda.device(_cuda_device(device)), tempfile.TemporaryDirectory(prefix="pel-trt-") as tmp:
        graph = _graph_for_precision(onnx_path, precision, Path(tmp), calibration_crops, key.digest(),
                                     keep_float)
        data = _build_serialized(trt, graph, input_size, precision, key.profile,
                                 cache / key.timing_cache_name(), workspace_gib)
    tmp_path = engine_path.with_suffix(".partial")
    tmp_path.write_bytes(data)
    tmp_path.replace(engine_path)  # atomic: concurrent replicas never read half an engine
    log.info("built TensorRT %s engine %s in %.0f s", precision, engine_path,
             time.perf_counter() - start)
    return engine_path


def _network_flags(trt: Any) -> tuple[int, bool]:
    flags = trt.NetworkDefinitionCreationFlag
    if hasattr(flags, "STRONGLY_TYPED"):
        return 1 << int(flags.STRONGLY_TYPED), True
    return (1 << int(flags.EXPLICIT_BATCH)) if hasattr(flags, "EXPLICIT_BATCH") else 0, False


def _build_serialized(trt: Any, graph: Path, input_size: int, precision: str,
                      profile: tuple[int, int, int], timing_cache: Path, workspace_gib: float) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags, strongly_typed = _network_flags(trt)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {graph.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if not strongly_typed:  # weakly typed (TensorRT < 10): precision from builder flags
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # explicit Q/DQ: no calibrator
    shapes = [(b, input_size, input_size, 3) for b in profile]
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(INPUT_NAME, *shapes)
    config.add_optimization_profile(opt_profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    data = builder.build_serialized_network(network, config)
    if data is None:
        raise RuntimeError(f"TensorRT failed to build the {precision} engine for {graph.name} "
                           "(see the TensorRT log above)")
    timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(memoryview(data))


class TensorRTBackend(Backend):
    """A deserialised engine and a pool of execution contexts on one GPU."""

    name = "tensorrt"

    def __init__(self, engine_path: str | Path, input_size: int, device: str = "cuda",
                 precision: str = "fp16", contexts: int = 2):
        trt = import_tensorrt()
        dev = _cuda_device(device)
        if contexts < 1:
            raise ValueError(f"need at least one execution context, got {contexts}")
        super().__init__(input_size, str(dev), precision)
        self.trt_version = trt.__version__
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(dev):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
            if self.engine is None:
                raise RuntimeError(f"cannot load {engine_path}: built by another TensorRT version "
                                   "or GPU? delete it and it is rebuilt")
            names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
            if names != {INPUT_NAME, OUTPUT_NAME}:
                raise ValueError(f"engine tensors {sorted(names)}, expected {INPUT_NAME}, {OUTPUT_NAME}")
            lo, _, hi = self.engine.get_tensor_profile_shape(INPUT_NAME, 0)
            self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
            self._pool: queue.Queue = queue.Queue()
            for _ in range(contexts):
                self._pool.put((self.engine.create_execution_context(), torch.cuda.Stream(dev)))
        self._dev = dev

    @classmethod
    def from_model(cls, model: PEL, onnx_path: str | Path | None, device: str = "cuda",
                   precision: str = "fp16", profile: tuple[int, int, int] = DEFAULT_PROFILE,
                   cache_dir: str | Path | None = None,
                   calibration_crops: np.ndarray | None = None, contexts: int = 2,
                   keep_float: tuple[str, ...] = ()) -> "TensorRTBackend":
        """Export the model's ONNX graph if needed, build or load the cached engine, load it."""
        if onnx_path is None:
            raise ValueError("the tensorrt backend needs an onnx_path to export to or load from")
        import_tensorrt()
        onnx_path = Path(onnx_path)
        if not onnx_path.exists():
            export_onnx(model, onnx_path)
        engine = build_engine(onnx_path, model.cfg.input_size, precision, cache_dir, profile,
                              calibration_crops, device=device, keep_float=keep_float)
        return cls(engine, model.cfg.input_size, device, precision, contexts)

    def describe(self) -> str:
        return f"tensorrt{self.trt_version}:{self.device}:{self.precision}"

    def _run(self, crops: np.ndarray) -> np.ndarray:
        if len(crops) < self.min_batch:  # pad up to the profile's minimum batch
            pad = np.repeat(crops[-1:], self.min_batch - len(crops), axis=0)
            return self._run(np.concatenate([crops, pad]))[:len(crops)]
        if len(crops) > self.max_batch:
            return np.concatenate([self._run(crops[i:i + self.max_batch])
                                   for i in range(0, len(crops), self.max_batch)])
        context, stream = self._pool.get()
        try:
            with torch.cuda.device(self._dev), torch.cuda.stream(stream):
                x = torch.from_numpy(crops).pin_memory().to(self._dev, non_blocking=True)
                out = torch.empty(len(crops), dtype=torch.float32, device=self._dev)
                if not context.set_input_shape(INPUT_NAME, tuple(x.shape)):
                    raise RuntimeError(f"batch shape {tuple(x.shape)} outside the engine's profile")
                context.set_tensor_address(INPUT_NAME, x.data_ptr())
                context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
                if not context.execute_async_v3(stream.cuda_stream):
                    raise RuntimeError("TensorRT execution failed (see the TensorRT log)")
                result = out.to("cpu", non_blocking=False)
                stream.synchronize()
            return result.numpy()
        finally:
            self._pool.put((context, stream))
