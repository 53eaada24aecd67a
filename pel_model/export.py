"""ONNX export with a dynamic batch axis.

The exported graph has the service's input contract: `crops` uint8 (N, S, S, 3) -> `logits`
float32 (N,). Normalisation and the DCT are inside the graph. Weights are stored inline (one
self-contained `.onnx` file) and the model is checked with `onnx.checker`.
"""
from __future__ import annotations

import logging
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pel import PEL

log = logging.getLogger(__name__)
INPUT_NAME, OUTPUT_NAME = "crops", "logits"
# Part of the service's cache name: bumped when the same weights export to a different graph
# (2: the column-sort median), so a cached export of an older graph is not served.
GRAPH_VERSION = 2


def export_onnx(model: "PEL", path: str | Path, opset: int = 18, example_batch: int = 2) -> Path:
    import onnx  # imported here: serving a cached export needs neither (nor their memory)
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().float().cpu()
    s = model.cfg.input_size
    example = torch.randint(0, 256, (example_batch, s, s, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    tmp = path.with_suffix(".tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(model, (example,), str(tmp), input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_shapes={"crops": {0: batch}},
                          opset_version=opset, dynamo=True, external_data=False, verbose=False)
    onnx.checker.check_model(str(tmp), full_check=True)
    tmp.replace(path)
    log.info("exported %s (%s, %dpx) to %s", type(model).__name__, model.cfg.backbone, s, path)
    return path
