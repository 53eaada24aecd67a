"""Weight averaging of checkpoints of one network (`pel average`).

A uniform average of the weights of a run's last epochs, or of runs fine-tuned one from another
(e.g. a learning-rate restart from a run's best): Stochastic Weight Averaging (Izmailov et al.,
"Averaging Weights Leads to Wider Optima and Better Generalization", UAI 2018), a "uniform soup"
in Wortsman et al., ICML 2022. It costs no training: the averaged file is
calibrated and evaluated like any checkpoint. BatchNorm running statistics are averaged too
(SWA proper re-estimates them with a pass over the training data; that is not done here).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pel_model.checkpoint import (CheckpointError, CheckpointMeta, file_digest, read_meta,
                                  save_checkpoint)


def average_checkpoints(paths: list[str | Path], out: str | Path) -> tuple[Path, CheckpointMeta]:
    """Write the uniform average of `paths` (same architecture) to `out`, uncalibrated."""
    import torch
    from safetensors.torch import load_file

    from pel_model.pel import PEL

    if len(paths) < 2:
        raise CheckpointError("weight averaging needs at least two checkpoints")
    metas = [read_meta(p) for p in paths]
    if any(m.model != metas[0].model for m in metas[1:]):
        raise CheckpointError("checkpoints to average have different model configs: "
                              + ", ".join(f"{p}: {m.model.backbone}@{m.model.input_size}"
                                          for p, m in zip(paths, metas)))
    total: dict[str, torch.Tensor] = {}
    for p in paths:
        for k, v in load_file(str(p)).items():
            if not v.is_floating_point():  # e.g. BatchNorm's num_batches_tracked: the largest
                total[k] = torch.maximum(total[k], v) if k in total else v
            else:
                total[k] = total[k] + v.double() if k in total else v.double()
    state = {k: (v / len(paths)).to(torch.float32) if v.is_floating_point() else v
             for k, v in total.items()}
    model = PEL(metas[0].model, load_pretrained=False)
    model.load_state_dict(state)  # strict: same keys and shapes as the architecture
    # the run's shared provenance; per-epoch figures stay with each averaged checkpoint below
    provenance = {k: v for k, v in metas[0].provenance.items()
                  if k not in ("epoch", "metrics", "history", "stopped")}
    provenance["weight_average"] = {
        "method": "uniform (SWA, Izmailov et al. 2018); BatchNorm statistics averaged",
        "checkpoints": [{"path": str(p), "sha256": file_digest(p),
                         "metrics": m.provenance.get("metrics")} for p, m in zip(paths, metas)],
    }
    meta = replace(metas[0], temperature=1.0, logit_bias=0.0, threshold=0.5, calibrated=False,
                   trained=all(m.trained for m in metas), provenance=provenance)
    return save_checkpoint(out, model, meta), meta
