"""Cost of one review heatmap (Grad-CAM of both streams, pel_model/grad_cam.py) on CPU, on the
explainer's one thread, vs one forward pass of the same network in PyTorch (the same run).

    python -m bench.bench_heatmap [--checkpoint models/pel-lite0-224.safetensors] [--reps 10]
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np


def main() -> None:
    import torch

    from pel_model.checkpoint import load_checkpoint
    from pel_model.config import DEFAULT_CHECKPOINT
    from pel_model.grad_cam import pel_heatmaps
    from workers.sample_media import astronaut

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)
    model, meta = load_checkpoint(args.checkpoint)
    size = meta.model.input_size
    from PIL import Image
    crop = np.asarray(Image.fromarray(astronaut()[0:260, 120:380]).resize((size, size)))[None]
    x = torch.from_numpy(crop)
    pel_heatmaps(model, crop)  # warm-up
    with torch.no_grad():
        model(x)
    cam, fwd = [], []
    for _ in range(args.reps):  # interleaved
        t0 = time.perf_counter()
        pel_heatmaps(model, crop)
        cam.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(x)
        fwd.append(time.perf_counter() - t0)
    out = {"checkpoint": args.checkpoint, "threads": 1, "reps": args.reps,
           "heatmap_ms_median": round(1000 * float(np.median(cam)), 1),
           "forward_ms_median": round(1000 * float(np.median(fwd)), 1),
           "heatmap_over_forward": round(float(np.median(cam) / np.median(fwd)), 2),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
