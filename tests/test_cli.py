"""The `pel` command line: export and info on a checkpoint, clear errors on bad input."""
import json

import numpy as np
import onnx
import pytest
from PIL import Image

from model_utils import SMALL, face_batch, small_model
from pel_model.backends import OnnxRuntimeBackend
from pel_model.checkpoint import CheckpointMeta, save_checkpoint
from pel_model.cli import main


def test_export_and_info(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "m.safetensors", small_model(),
                           CheckpointMeta(model=SMALL, threshold=0.4, trained=True))
    faces = tmp_path / "faces"  # INT8 calibration crops: a folder of face images
    faces.mkdir()
    for i, crop in enumerate(face_batch(8, 150, seed=9)):
        Image.fromarray(crop).save(faces / f"{i}.png")
    assert main(["export", str(ckpt), "-o", str(tmp_path / "m.onnx"), "--precision", "int8",
                 "--calibration-dir", str(faces)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["input_size"] == 224 and out["onnx_int8"] == str(tmp_path / "m.int8.onnx")
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    ops = {n.op_type for n in onnx.load(out["onnx_int8"]).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    crops = face_batch(3, 224, seed=4)
    p32 = OnnxRuntimeBackend(tmp_path / "m.onnx", 224).logits(crops)
    backend = OnnxRuntimeBackend(out["onnx_int8"], 224)
    assert backend.describe() == "onnxruntime:cpu:int8"
    assert np.abs(1 / (1 + np.exp(-backend.logits(crops))) - 1 / (1 + np.exp(-p32))).max() < 0.2
    assert main(["info", str(ckpt)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["threshold"] == 0.4 and info["model"]["backbone"] == "efficientnet_b0"


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "none.safetensors")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_export_option_errors(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "m.safetensors", small_model(), CheckpointMeta(model=SMALL))
    assert main(["export", str(ckpt), "--precision", "int8"]) == 2
    assert "--calibration-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(ckpt), "--profile", "8,4,64"])
    assert "MIN,OPT,MAX" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(ckpt), "--precision", "int8", "--calibration-dir", str(empty)]) == 2
    assert "calibration needs at least 8" in capsys.readouterr().err
