"""The PEL network: placement, shapes, training signal, input contract, checkpoints."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from pel_model.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint, read_meta, save_checkpoint
from pel_model.config import ModelConfig
from pel_model.layers import ChannelAttention, MutualEnhancement, NoiseEnhancement
from pel_model.pel import PEL

from model_utils import SMALL, face_batch, small_model, offline_hub


def _stage_counts(model, cls):
    counts = [0] * len(model.rgb.blocks)
    for name, mod in model.named_modules():
        if isinstance(mod, cls):
            counts[int(name.split(".")[1])] += 1
    return counts


def test_default_b4_has_the_papers_placement_and_matching_stream_sizes():
    model = PEL(ModelConfig(pretrained=False), load_pretrained=False).eval()
    assert [len(s) for s in model.rgb.blocks] == [2, 4, 4, 6, 6, 8, 2]
    # one module per stream and stage
    assert _stage_counts(model, NoiseEnhancement) == [2, 2, 0, 0, 0, 0, 0]
    assert _stage_counts(model, ChannelAttention) == [0, 2, 2, 2, 2, 2, 0]
    assert _stage_counts(model, MutualEnhancement) == [0, 1, 1, 1, 1, 1, 0]
    assert model.fc.in_features == 2 * 1792
    sizes = {"rgb": [], "freq": []}
    hooks = [stage.register_forward_hook(lambda m, i, o, k=k: sizes[k].append(tuple(o.shape[1:])))
             for k in sizes for stage in getattr(model, k).blocks]
    with torch.no_grad():
        out = model(torch.zeros(1, 320, 320, 3, dtype=torch.uint8))
    for h in hooks:
        h.remove()
    assert out.shape == (1,)
    assert sizes["rgb"] == sizes["freq"]
    assert [s[1] for s in sizes["rgb"]] == [160, 80, 40, 20, 20, 10, 10]
    assert [s[0] for s in sizes["rgb"]] == [24, 32, 56, 112, 160, 272, 448]


def test_placement_is_configurable():
    cfg = SMALL.model_copy(update={"noise_stages": (0,), "attention_stages": (2, 3), "mutual_stages": ()})
    model = PEL(cfg, load_pretrained=False)
    assert _stage_counts(model, NoiseEnhancement)[:2] == [2, 0]
    assert sum(_stage_counts(model, ChannelAttention)) == 4
    assert sum(_stage_counts(model, MutualEnhancement)) == 0
    with pytest.raises(ValueError, match="out of range"):
        PEL(SMALL.model_copy(update={"mutual_stages": (7,)}), load_pretrained=False)


def test_few_steps_lower_the_loss_and_train_both_streams():
    torch.manual_seed(0)
    cfg = SMALL.model_copy(update={"input_size": 96})
    model = PEL(cfg, load_pretrained=False).train()
    x = torch.from_numpy(face_batch(8, 96))
    x[4:, :, :48] = x[4:, :, :48] // 2 + 60  # a visible "manipulation" on the fakes
    y = torch.tensor([0.0] * 4 + [1.0] * 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        # Both streams learn from the first step; the shared attention once its zero-initialised
        # depthwise gates have moved (after the first step).
        watched = [model.rgb.conv_stem.weight, model.freq.conv_stem.weight,
                   model.freq_input.reduce.weight, model.mutual["1"].dw_freq.weight]
        if losses:
            watched.append(model.mutual["1"].attention.weight)
        for p in watched:
            assert p.grad is not None and p.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7, losses


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 224, 224, 3), np.float32), "uint8"),
    (np.zeros((2, 3, 224, 224), np.uint8), "shape"),
    (np.zeros((224, 224, 3), np.uint8), "shape"),
    (np.zeros((2, 320, 320, 3), np.uint8), "224x224"),
    (np.zeros((0, 224, 224, 3), np.uint8), "empty"),
])
def test_bad_inputs_raise_clear_errors(bad, match):
    model = PEL(SMALL, load_pretrained=False).eval()
    with pytest.raises(ValueError, match=match):
        model(torch.from_numpy(bad))


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    model = small_model()
    meta = CheckpointMeta(model=SMALL, temperature=1.7, logit_bias=-0.25, threshold=0.42, trained=True,
                          calibrated=True, provenance={"data": "unit-test"})
    path = save_checkpoint(tmp_path / "m.safetensors", model, meta)
    loaded, meta2 = load_checkpoint(path)
    assert meta2 == replace(meta, model=model.cfg) and read_meta(path).threshold == 0.42
    assert meta2.model.rgb_mean == (0.485, 0.456, 0.406)  # resolved from the backbone, stored
    x = torch.from_numpy(face_batch(3, 224))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)

    # Metadata claims a different architecture than the stored weights.
    other = PEL(SMALL.model_copy(update={"mutual_stages": (1, 2)}), load_pretrained=False)
    bad = tmp_path / "bad.safetensors"
    save_checkpoint(bad, model, meta)
    import json
    from safetensors.torch import load_file, save_file
    tweaked = json.loads(meta.to_json())
    tweaked["model"] = other.cfg.model_dump(mode="json")
    save_file(load_file(str(bad)), str(bad), metadata={"pel": json.dumps(tweaked)})
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_checkpoint(bad)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_meta(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a safetensors"):
        read_meta(junk)
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="no PEL metadata"):
        read_meta(tmp_path / "plain.safetensors")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "v9.safetensors"),
              metadata={"pel": '{"format_version": 9}'})
    with pytest.raises(CheckpointError, match="format version"):
        read_meta(tmp_path / "v9.safetensors")
    newer = json.loads(CheckpointMeta().to_json()) | {"logit_scale_2": 1.0}  # a field from the future
    save_file({"w": torch.zeros(1)}, str(tmp_path / "newer.safetensors"),
              metadata={"pel": json.dumps(newer)})
    with pytest.raises(CheckpointError, match="does not know.*logit_scale_2"):
        read_meta(tmp_path / "newer.safetensors")


def test_backbone_weights_from_a_local_file_load_into_both_streams(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(5)
    ref = timm.create_model("efficientnet_b0", pretrained=False, num_classes=0)
    path = tmp_path / "b0.safetensors"
    save_file(ref.state_dict(), str(path))
    model = PEL(SMALL.model_copy(update={"backbone_weights": path}), load_pretrained=True)
    for stream in (model.rgb, model.freq):
        torch.testing.assert_close(stream.blocks[3][0].conv_pw.weight, ref.blocks[3][0].conv_pw.weight)
    torch.testing.assert_close(model.rgb.conv_stem.weight, ref.conv_stem.weight)
    assert model.freq.conv_stem.in_channels == 64  # the frequency stem is new, not loaded


def test_unreachable_imagenet_weights_fall_back_to_random_with_a_warning(monkeypatch, caplog):
    offline_hub(monkeypatch)  # no download is attempted
    model = PEL(SMALL.model_copy(update={"pretrained": True}), load_pretrained=True)
    assert "random initialisation" in caplog.text
    assert model.fc.in_features == 2 * 1280


def _median_filtered_crops(crops: np.ndarray) -> np.ndarray:
    """Reference 3x3 median per channel (replicate borders) with torch.median."""
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float()
    p = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    patches = p.unfold(2, 3, 1).unfold(3, 3, 1).reshape(*x.shape, 9)
    return patches.median(dim=-1).values.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def test_input_median_filters_the_crop_ahead_of_both_streams_and_travels_in_checkpoints(tmp_path):
    plain = small_model(seed=3)
    cfg = plain.cfg.model_copy(update={"input_median": True})
    filtered = PEL(cfg, load_pretrained=False).eval()
    filtered.load_state_dict(plain.state_dict())  # no weights of its own
    crops = face_batch(4, 224, seed=7)
    noisy = crops.copy()
    noisy[:, ::17, ::13] = 255  # isolated impulses: the median removes every one
    with torch.no_grad():
        got = filtered(torch.from_numpy(noisy))
        ref = plain(torch.from_numpy(_median_filtered_crops(noisy)))
        unfiltered = plain(torch.from_numpy(noisy))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert (got - unfiltered).abs().max() > 1e-3  # the prefilter changes what the streams see
    path = save_checkpoint(tmp_path / "m.safetensors", filtered, CheckpointMeta(model=cfg, trained=True))
    loaded, meta = load_checkpoint(path)
    assert meta.model.input_median and loaded.cfg.input_median
    with torch.no_grad():
        torch.testing.assert_close(loaded(torch.from_numpy(noisy)), got, rtol=0, atol=1e-6)
