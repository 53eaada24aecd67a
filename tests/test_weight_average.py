"""`pel average`: the uniform weight average (SWA) of checkpoints, checked tensor by tensor."""
import json

import numpy as np
import torch
from safetensors.numpy import load_file

from model_utils import SMALL, face_batch, small_model
from pel_model.checkpoint import CheckpointMeta, load_checkpoint, read_meta, save_checkpoint
from pel_model.cli import main


def _ckpt(tmp_path, name, seed, cfg=SMALL):
    meta = CheckpointMeta(model=cfg, trained=True, calibrated=True, temperature=2.0, logit_bias=0.3,
                          threshold=0.7, provenance={"metrics": f"epoch {seed}"})
    return save_checkpoint(tmp_path / name, small_model(seed, cfg), meta)


def test_average_is_the_mean_of_every_weight_and_statistic(tmp_path, capsys):
    paths = [_ckpt(tmp_path, f"e{i}.safetensors", seed=i) for i in range(3)]
    out = tmp_path / "avg.safetensors"
    assert main(["average", *map(str, paths), "-o", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["averaged"] == 3

    states = [load_file(str(p)) for p in paths]
    avg = load_file(str(out))
    assert set(avg) == set(states[0])
    for k, v in avg.items():
        if np.issubdtype(v.dtype, np.floating):
            np.testing.assert_allclose(v, np.mean([s[k] for s in states], axis=0), rtol=1e-6,
                                       atol=1e-7, err_msg=k)
        else:  # BatchNorm's num_batches_tracked
            assert v == max(s[k] for s in states), k
    assert any("running_var" in k for k in avg)

    meta = read_meta(out)  # calibration is the averaged model's own, to be fitted again
    assert meta.trained and not meta.calibrated and meta.temperature == 1.0
    assert meta.logit_bias == 0.0
    assert [c["metrics"] for c in meta.provenance["weight_average"]["checkpoints"]] == \
        ["epoch 0", "epoch 1", "epoch 2"]
    assert "metrics" not in meta.provenance  # no one epoch's figures claimed for the average
    model, _ = load_checkpoint(out)
    with torch.no_grad():
        logits = model(torch.from_numpy(face_batch(4, SMALL.input_size)))
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_average_refuses_one_checkpoint_or_different_architectures(tmp_path, capsys):
    a = _ckpt(tmp_path, "a.safetensors", 0)
    b = _ckpt(tmp_path, "b.safetensors", 1, SMALL.model_copy(update={"input_size": 128}))
    out = tmp_path / "avg.safetensors"
    assert main(["average", str(a), "-o", str(out)]) == 2
    assert "at least two" in capsys.readouterr().err
    assert main(["average", str(a), str(b), "-o", str(out)]) == 2
    assert "different model configs" in capsys.readouterr().err
    assert not out.exists()
