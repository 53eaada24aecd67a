"""INT8 on CPU: ONNX Runtime with the Q/DQ INT8 graph vs ONNX Runtime FP32 vs PyTorch eager FP32.

    python -m bench.bench_int8_cpu --out int8.json               # b4@320, batches 8 and 1
    python -m bench.bench_int8_cpu --config b0@128 --batches 1,2 --repeats 1    # quick look

One run, three variants timed interleaved (`bench.common.time_interleaved`) through the service's
backends. The INT8 graph comes from `pel_model.quantize.quantize_int8` (QDQ, per-channel weights,
uint8 activations, front end kept in float), calibrated on realistic face crops (real photos
from ../shared/data/faces-real when present, else the astronaut's face, jittered). Weights are
random with BatchNorm statistics estimated on face crops: speed does not depend on their values,
and the accuracy cost is measured separately (tests/test_quantize.py on a fine-tuned model).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pel_model.backends import OnnxRuntimeBackend, TorchBackend
from pel_model.export import export_onnx
from pel_model.quantize import load_calibration_crops, quantize_int8

from .bench_model import _ints, build_model, parse_spec
from .common import face_crops, machine_info, markdown_table, time_interleaved

VARIANTS = ("torch_fp32", "ort_fp32", "ort_int8")
COLUMNS = [("config", "config"), ("batch", "batch"),
           ("torch_fp32_median_s", "eager fp32 s/batch"), ("ort_fp32_median_s", "ORT fp32 s/batch"),
           ("ort_int8_median_s", "ORT int8 s/batch"),
           ("torch_fp32_faces_per_s", "eager faces/s"), ("ort_fp32_faces_per_s", "ORT fp32 faces/s"),
           ("ort_int8_faces_per_s", "ORT int8 faces/s"),
           ("int8_vs_ort_fp32", "int8 / ORT fp32 speed"), ("int8_vs_eager", "int8 / eager speed")]


def calibration_crops(size: int, n: int = 32) -> tuple[np.ndarray, str]:
    """Real face photos from the shared data folder when present, else astronaut variants."""
    root = Path(os.environ.get("PEL_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    folder = root / "faces-real" / "images"
    if folder.is_dir():
        return load_calibration_crops(folder, size, limit=n), f"{n} photos from {folder}"
    return face_crops(n, size, seed=7), f"{n} astronaut face variants"


def run(config: str, batches: Sequence[int], warmup: int, repeats: int, calib_n: int,
        log: Callable[[str], None]) -> dict[str, Any]:
    cfg = parse_spec(config)
    started = time.perf_counter()
    machine = machine_info()
    model = build_model(cfg)
    calib, calib_source = calibration_crops(cfg.input_size, calib_n)
    with tempfile.TemporaryDirectory(prefix="pel-int8-") as tmp:
        fp32 = export_onnx(model, Path(tmp) / "pel.onnx")
        t0 = time.perf_counter()
        int8 = quantize_int8(fp32, Path(tmp) / "pel.int8.onnx", calib)
        quantize_s = time.perf_counter() - t0
        log(f"{config}: exported and quantised ({quantize_s:.0f} s, calibration: {calib_source})")
        backends = {"torch_fp32": TorchBackend(model), "ort_fp32": OnnxRuntimeBackend(fp32, cfg.input_size),
                    "ort_int8": OnnxRuntimeBackend(int8, cfg.input_size)}
        probe = face_crops(8, cfg.input_size, seed=3)
        ref = backends["ort_fp32"].logits(probe)
        int8_logit_diff = float(np.max(np.abs(backends["ort_int8"].logits(probe) - ref)))
        rows = []
        for batch in batches:
            crops = face_crops(batch, cfg.input_size, seed=batch)
            timings = time_interleaved({k: (lambda b=b: b.logits(crops)) for k, b in backends.items()},
                                       warmup=warmup, repeats=repeats)
            row: dict[str, Any] = {"config": config, "batch": batch}
            for k, t in timings.items():
                row.update({f"{k}_median_s": t.median, f"{k}_min_s": t.min,
                            f"{k}_faces_per_s": batch / t.median, f"{k}_seconds": list(t.seconds)})
            row["int8_vs_ort_fp32"] = row["ort_fp32_median_s"] / row["ort_int8_median_s"]
            row["int8_vs_eager"] = row["torch_fp32_median_s"] / row["ort_int8_median_s"]
            rows.append(row)
            log(f"batch {batch}: " + ", ".join(f"{k} {timings[k].median:.3f} s" for k in VARIANTS))
    return {"machine": machine, "settings": {"config": config, "batches": list(batches),
                                             "warmup": warmup, "repeats": repeats,
                                             "calibration": calib_source},
            "quantize_s": quantize_s, "int8_max_abs_logit_diff_random_weights": int8_logit_diff,
            "rows": rows, "total_s": time.perf_counter() - started}


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    head = (f"Machine: {m['cpu_model']}, {m['nproc']} CPUs, torch {m['torch']} "
            f"({m['torch_threads']} threads), onnxruntime {m['onnxruntime']}, {m['date']}; "
            f"quantisation took {result['quantize_s']:.0f} s.")
    return head + "\n\n" + markdown_table(result["rows"], COLUMNS)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_int8_cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="b4@320", help="EfficientNet@px (default b4@320)")
    p.add_argument("--batches", type=_ints, default=[8, 1], help="comma-separated (default 8,1)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--calibration", type=int, default=32, help="calibration crops (default 32)")
    p.add_argument("--out", type=Path, help="write the full results as JSON here")
    args = p.parse_args(argv)
    result = run(args.config, args.batches, args.warmup, args.repeats, args.calibration,
                 lambda msg: print(msg, file=sys.stderr, flush=True))
    print(render(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
