"""Small PEL models for tests: b0 backbone, random weights, BatchNorm statistics re-estimated so
that outputs depend on the input (a freshly initialised EfficientNet in eval mode is nearly constant)."""
from __future__ import annotations

import numpy as np
import torch

from pel_model.config import ModelConfig
from pel_model.pel import PEL

SMALL = ModelConfig(backbone="efficientnet_b0", input_size=224, pretrained=False)


def face_batch(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Natural-looking uint8 crops: the astronaut photo, shifted and jittered, plus noise."""
    from skimage import data
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = data.astronaut()[0:220, 140:330]
    out = []
    for _ in range(n):
        y, x = rng.integers(0, 20, 2)
        crop = Image.fromarray(img[y:y + 200, x:x + 170]).resize((size, size))
        arr = np.asarray(crop).astype(np.int16) + rng.integers(-20, 21, (size, size, 3))
        out.append(np.clip(arr, 0, 255).astype(np.uint8))
    return np.stack(out)


def small_model(seed: int = 0, cfg: ModelConfig = SMALL) -> PEL:
    torch.manual_seed(seed)
    model = PEL(cfg, load_pretrained=False)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(2):
            model(torch.from_numpy(face_batch(8, cfg.input_size, seed=100 + i)))
    return model.eval()


def offline_hub(monkeypatch) -> None:
    """Hugging Face Hub offline for one test. `HF_HUB_OFFLINE` is read when huggingface_hub is
    imported, so the environment variable alone comes too late: set its constant as well."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
