"""The `pel` command line: export and info on a checkpoint, clear errors on bad input."""
import json

import onnx

from model_utils import SMALL, small_model
from pel_model.checkpoint import CheckpointMeta, save_checkpoint
from pel_model.cli import main


def test_export_and_info(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "m.safetensors", small_model(),
                           CheckpointMeta(model=SMALL, threshold=0.4, trained=True))
    assert main(["export", str(ckpt), "-o", str(tmp_path / "m.onnx")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["input_size"] == 224
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    assert main(["info", str(ckpt)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["threshold"] == 0.4 and info["model"]["backbone"] == "efficientnet_b0"


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "none.safetensors")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
