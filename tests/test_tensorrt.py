"""TensorRT engines (optional `trt` extra, CUDA GPU): build, match ONNX Runtime, reuse the cache.

Skips cleanly without TensorRT or a GPU. The TensorRT-free parts (cache keys, graph rewrites)
are checked in tests/test_quantize.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

trt = pytest.importorskip("tensorrt", reason="TensorRT not installed (pip install 'pel-moderation[trt]')")
if not torch.cuda.is_available():
    pytest.skip("TensorRT tests need a CUDA GPU", allow_module_level=True)

from pel_model.backends import OnnxRuntimeBackend, create_backend  # noqa: E402
from pel_model.backends.tensorrt_backend import TensorRTBackend, build_engine  # noqa: E402

from model_utils import face_batch, small_model  # noqa: E402

pytestmark = pytest.mark.gpu



def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


@pytest.mark.parametrize("precision, atol", [("fp32", 1e-3), ("fp16", 2e-2), ("int8", 6e-2)])
def test_engine_matches_onnxruntime(model, onnx_path, tmp_path, precision, atol):
    calib = face_batch(32, 224, seed=11) if precision == "int8" else None
    engine = build_engine(onnx_path, 224, precision, tmp_path, profile=(1, 8, 16),
                          calibration_crops=calib)
    backend = TensorRTBackend(engine, 224, "cuda", precision)
    assert backend.describe() == f"tensorrt{trt.__version__}:cuda:{precision}"
    for batch in (1, 7, 40):  # 40 > the profile's max: split into engine-sized chunks
        crops = face_batch(batch, 224, seed=batch)
        ref = _sigmoid(OnnxRuntimeBackend(onnx_path, 224).logits(crops))
        np.testing.assert_allclose(_sigmoid(backend.logits(crops)), ref, rtol=0, atol=atol)


def test_engine_cache_is_reused(model, onnx_path, tmp_path):
    first = build_engine(onnx_path, 224, "fp16", tmp_path, profile=(1, 4, 8))
    stamp = first.stat().st_mtime_ns
    again = build_engine(onnx_path, 224, "fp16", tmp_path, profile=(1, 4, 8))
    assert again == first and again.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    other = build_engine(onnx_path, 224, "fp16", tmp_path, profile=(1, 4, 16))
    assert other != first  # a different profile is a different engine
    assert list(tmp_path.glob("timing-*.cache"))


def test_auto_selects_tensorrt_on_cuda(model, onnx_path, tmp_path):
    backend = create_backend(small_model(seed=1), "auto", "cuda", "fp16", onnx_path)
    assert isinstance(backend, TensorRTBackend) and backend.describe().startswith("tensorrt")
    with pytest.raises(ValueError, match="calibration"):
        build_engine(onnx_path, 224, "int8", tmp_path)
