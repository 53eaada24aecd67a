"""ONNX export and the inference backends, checked against PyTorch."""
import os
import warnings
import numpy as np
import onnx
import pytest
import torch

from pel_model.backends import OnnxRuntimeBackend, TorchBackend, create_backend
from pel_model.checkpoint import CheckpointMeta, save_checkpoint
from pel_model.config import DetectorConfig
from pel_model.scorer import load_scorer

from model_utils import SMALL, face_batch, small_model



def test_onnx_graph_is_valid_with_dynamic_batch(onnx_path):
    m = onnx.load(str(onnx_path))
    onnx.checker.check_model(m, full_check=True)
    dim0 = m.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert not any(n.op_type.startswith("Median") for n in m.graph.node)


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_onnxruntime_matches_pytorch(model, onnx_path, batch):
    crops = face_batch(batch, 224, seed=batch)
    with torch.no_grad():
        ref = torch.sigmoid(model(torch.from_numpy(crops))).numpy()
    got = 1 / (1 + np.exp(-OnnxRuntimeBackend(onnx_path, 224).logits(crops)))
    if batch > 1:
        assert ref.std() > 1e-3  # the model's outputs depend on its input
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)


def test_onnx_export_of_the_input_median_matches_pytorch(model, tmp_path):
    from pel_model.export import export_onnx
    from pel_model.pel import PEL

    filtered = PEL(model.cfg.model_copy(update={"input_median": True}), load_pretrained=False).eval()
    filtered.load_state_dict(model.state_dict())
    path = export_onnx(filtered, tmp_path / "median.onnx")
    crops = face_batch(3, 224, seed=11)
    crops[:, ::9, ::7] = 0  # impulses, so the prefilter has work to do
    with torch.no_grad():
        ref = filtered(torch.from_numpy(crops)).numpy()
        plain = model(torch.from_numpy(crops)).numpy()
    got = OnnxRuntimeBackend(path, 224).logits(crops)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    assert np.abs(ref - plain).max() > 1e-3


def test_torch_backend_and_auto_selection(model, onnx_path):
    crops = face_batch(4, 224)
    tb = TorchBackend(model)
    auto = create_backend(model, "auto", "cpu", onnx_path=onnx_path)
    assert isinstance(auto, OnnxRuntimeBackend) and auto.describe() == "onnxruntime:cpu:fp32"
    np.testing.assert_allclose(auto.logits(crops), tb.logits(crops), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="CUDA"):
        TorchBackend(model, "cpu", "fp16")
    with pytest.raises(ValueError, match="unknown backend"):
        create_backend(model, "tpu", "cpu")
    frozen = crops.copy()
    frozen.flags.writeable = False  # as Ray hands arrays over (zero-copy, read-only)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.from_numpy's "not writable" UserWarning
        np.testing.assert_array_equal(tb.logits(frozen), tb.logits(crops))
    for backend in (tb, auto):
        with pytest.raises(ValueError, match="uint8"):
            backend.logits(crops.astype(np.float32))
        with pytest.raises(ValueError, match="224x224"):
            backend.logits(face_batch(1, 96))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision, atol", [("fp32", 1e-3), ("fp16", 2e-2)])
def test_torch_cuda_backend_matches_cpu(model, precision, atol):
    crops = face_batch(8, 224)
    ref = 1 / (1 + np.exp(-TorchBackend(model).logits(crops)))
    got = 1 / (1 + np.exp(-TorchBackend(small_model(seed=1), "cuda", precision).logits(crops)))
    np.testing.assert_allclose(got, ref, atol=atol)


@pytest.fixture(scope="module")
def calibrated(model, tmp_path_factory):
    """A calibrated checkpoint of `model` and the artifacts folder its first load exports to."""
    tmp = tmp_path_factory.mktemp("calibrated")
    meta = CheckpointMeta(model=SMALL, temperature=2.0, logit_bias=-0.4, threshold=0.3,
                          trained=True, calibrated=True)
    return save_checkpoint(tmp / "m.safetensors", model, meta), tmp / "art"


def test_scorer_applies_checkpoint_calibration(model, calibrated, monkeypatch):
    ckpt, art = calibrated
    scorer = load_scorer(DetectorConfig(checkpoint=ckpt, artifacts_dir=art), device="cpu")
    crops = face_batch(5, 224)
    logits = TorchBackend(model).logits(crops)
    np.testing.assert_allclose(scorer.probabilities(crops), 1 / (1 + np.exp(-(logits / 2.0 - 0.4))),
                               atol=1e-4)
    assert scorer.threshold == 0.3 and not scorer.warnings
    assert scorer.model_id.startswith("pel-efficientnet_b0-224@") and "onnxruntime" in scorer.model_id
    assert list(art.glob("*.onnx"))  # the export is cached beside the checkpoint's hash

    # A replica start with the export cached never builds the PyTorch network (memory, time).
    import pel_model.scorer as scorer_module

    def no_torch_model(*a, **k):
        raise AssertionError("the PyTorch network was built although the ONNX export is cached")

    monkeypatch.setattr(scorer_module, "load_checkpoint", no_torch_model)
    again = load_scorer(DetectorConfig(checkpoint=ckpt, artifacts_dir=art), device="cpu")
    np.testing.assert_allclose(again.probabilities(crops), scorer.probabilities(crops), atol=1e-6)


def test_untrained_model_warns_loudly(tmp_path, caplog):
    cfg = DetectorConfig(checkpoint=None, model=SMALL, backend="torch", artifacts_dir=tmp_path)
    scorer = load_scorer(cfg, device="cpu")
    assert any("never trained" in w for w in scorer.warnings)
    assert "never trained" in caplog.text and "@untrained+" in scorer.model_id


def test_detector_config_compiled_inference_options(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="calibration_dir"):
        DetectorConfig(precision="int8")
    with pytest.raises(ValidationError, match="min <= opt <= max"):
        DetectorConfig(trt_profile=(8, 4, 64))
    with pytest.raises(ValidationError):
        DetectorConfig(compile="fastest")
    assert DetectorConfig().tensorrt_profile == (1, 16, 32)  # follows max_batch_size
    assert DetectorConfig(max_batch_size=64).tensorrt_profile == (1, 32, 64)
    assert DetectorConfig(trt_profile=(2, 8, 16)).tensorrt_profile == (2, 8, 16)
    cfg = DetectorConfig(precision="int8", calibration_dir=tmp_path)
    assert cfg.calibration_dir == tmp_path


def test_cpu_replica_serves_a_cached_export_without_importing_torch(calibrated):
    """The CPU profile: a fresh process (as a replica is) loads the cached ONNX export with the
    replica's thread budget, sleeping (not spinning) pool threads, and never imports torch."""
    import json
    import subprocess
    import sys

    ckpt, art = calibrated
    load_scorer(DetectorConfig(checkpoint=ckpt, artifacts_dir=art), device="cpu")  # cached export
    code = f"""
import json, sys
import numpy as np
from pel_model.config import DetectorConfig
from pel_model.scorer import cpu_threads, load_scorer
cfg = DetectorConfig(checkpoint={str(ckpt)!r}, artifacts_dir={str(art)!r}, num_cpus=3.5)
s = load_scorer(cfg)
p = s.probabilities(np.zeros((2, 224, 224, 3), np.uint8))
opts = s.backend.session.get_session_options()
print(json.dumps({{"torch": "torch" in sys.modules, "timm": "timm" in sys.modules,
                  "threads": opts.intra_op_num_threads, "rule": cpu_threads(cfg),
                  "spinning": opts.get_session_config_entry("session.intra_op.allow_spinning"),
                  "mem_pattern": opts.enable_mem_pattern, "n": len(p),
                  "device": s.backend.device}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"torch": False, "timm": False, "threads": 2, "rule": 2, "spinning": "0",
                   "mem_pattern": False, "n": 2, "device": "cpu"}


def test_cpu_thread_rule():
    from pel_model.scorer import cpu_threads

    assert cpu_threads(DetectorConfig(num_cpus=0.5)) == 1
    assert cpu_threads(DetectorConfig(num_cpus=1.0)) == 1
    assert cpu_threads(DetectorConfig(num_cpus=3.2)) == 2  # the budget split between 2 calls
    assert cpu_threads(DetectorConfig(num_cpus=3.2, cpu_runs=1)) == 4
    assert cpu_threads(DetectorConfig(num_cpus=0.5, threads=3)) == 3
    with pytest.raises(ValueError):
        DetectorConfig(cpu_runs=0)
