"""PEL network speed on CPU: PyTorch eager (fp32) vs ONNX Runtime (fp32), against the machine's
matrix-multiply roofline, in one run.

    python -m bench.bench_model                       # b4@320 and b0@224, batches 1, 8, 32
    python -m bench.bench_model --quick               # b0@96, batches 1, 2, one repetition
    python -m bench.bench_model --configs b0@224 --batches 1,8 --out results.json

Both variants go through the service's public backends (`TorchBackend`, `OnnxRuntimeBackend`),
so the figures are those of what the service runs. Weights are random (`load_pretrained=False`,
BatchNorm statistics estimated on face crops): speed does not depend on their values. Per model: FLOPs of one face (FlopCounterMode, 2 per
multiply-accumulate); per batch: median and min seconds per batch over interleaved repetitions,
faces/s, ORT/eager speed-up, and the fraction of the sgemm roofline reached; ONNX Runtime also
as one single-threaded call per core at once (how a CPU replica runs it, `detector.cpu_runs`).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from pel_model.backends import OnnxRuntimeBackend, TorchBackend
from pel_model.config import ModelConfig
from pel_model.export import export_onnx
from pel_model.pel import PEL

from .common import (count_flops, face_crops, machine_info, markdown_table, numpy_gemm_gflops,
                     time_calls_per_core, time_interleaved, torch_gemm_gflops)

DEFAULT_CONFIGS = ("b4@320", "b0@224")
DEFAULT_BATCHES = (1, 8, 32)
QUICK = {"configs": ("b0@96",), "batches": (1, 2), "warmup": 1, "repeats": 1, "gemm_n": 1024}
_SPEC = re.compile(r"^(?:(?:tf_)?efficientnet_)?(b[0-8]|lite[0-4])@(\d+)(\+median)?$")

TABLE_COLUMNS = [
    ("config", "config"), ("gflops_per_face", "GFLOPs/face"), ("batch", "batch"),
    ("torch_median_s", "eager s/batch (median)"), ("torch_min_s", "eager min"),
    ("ort_median_s", "ORT s/batch (median)"), ("ort_min_s", "ORT min"),
    ("torch_faces_per_s", "eager faces/s"), ("ort_faces_per_s", "ORT faces/s"),
    ("speedup", "ORT/eager speed-up"),
    ("torch_roofline_pct", "eager % of sgemm"), ("ort_roofline_pct", "ORT % of sgemm"),
    ("ort_calls_faces_per_s", "ORT one-thread call per core, faces/s"),
    ("ort_calls_roofline_pct", "... % of sgemm"),
]


def parse_spec(spec: str) -> ModelConfig:
    """"b4@320" (or "efficientnet_b4@320"), "lite0@224" (timm's tf_efficientnet_lite0, the
    shipped model's backbone) -> ModelConfig for that backbone and crop size; a "+median" suffix
    ("lite0@224+median") switches the input median prefilter on."""
    m = _SPEC.match(spec.strip().lower())
    if not m:
        raise ValueError(f"bad model spec {spec!r}: expected e.g. b4@320 or lite0@224")
    variant = m.group(1)
    backbone = f"tf_efficientnet_{variant}" if variant.startswith("lite") else f"efficientnet_{variant}"
    return ModelConfig(backbone=backbone, input_size=int(m.group(2)), pretrained=False,
                       input_median=bool(m.group(3)))


def _label(cfg: ModelConfig) -> str:
    name = f"{cfg.backbone.removeprefix('tf_').removeprefix('efficientnet_')}@{cfg.input_size}"
    return name + ("+median" if cfg.input_median else "")


def build_model(cfg: ModelConfig, seed: int = 0, calibration_batch: int = 4) -> PEL:
    """Random-weight PEL with BatchNorm statistics estimated on face crops.

    With the default statistics (mean 0, variance 1) a random network's activations shrink
    stage after stage and its output is a constant; estimated statistics keep activations at
    trained-network magnitudes (no denormals) and make the logits depend on the input, so the
    ORT/eager agreement check is meaningful.
    """
    torch.manual_seed(seed)
    model = PEL(cfg, load_pretrained=False)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for i in range(2):
            model(torch.from_numpy(face_crops(calibration_batch, cfg.input_size, seed=1000 + i)))
    return model.eval()


def gflops_per_face(model: PEL) -> float:
    """GFLOPs of the whole network (both streams, head) for one face crop."""
    return count_flops(model, torch.from_numpy(face_crops(1, model.cfg.input_size))) / 1e9


def roofline(gemm_n: int = 2048, repeats: int = 5) -> dict[str, float]:
    return {"torch_sgemm_gflops": torch_gemm_gflops(gemm_n, repeats),
            "numpy_sgemm_gflops": numpy_gemm_gflops(gemm_n, repeats)}


def bench_model(cfg: ModelConfig, batches: Sequence[int], warmup: int, repeats: int,
                workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Export one model, then time both backends on each batch size, interleaved."""
    label = _label(cfg)
    model = build_model(cfg)
    flops = gflops_per_face(model)
    start = time.perf_counter()
    onnx_path = export_onnx(model, workdir / f"pel_{label.replace('@', '_')}.onnx")
    export_s = time.perf_counter() - start
    log(f"{label}: {flops:.2f} GFLOPs/face, ONNX export {export_s:.0f} s")
    backends = {"torch": TorchBackend(model), "onnxruntime": OnnxRuntimeBackend(onnx_path, cfg.input_size)}
    one_thread = OnnxRuntimeBackend(onnx_path, cfg.input_size, threads=1)
    cores = os.cpu_count() or 1
    probe = face_crops(2, cfg.input_size, seed=1)
    logit_diff = float(np.max(np.abs(backends["torch"].logits(probe) - backends["onnxruntime"].logits(probe))))
    per_batch = []
    for batch in batches:
        crops = face_crops(batch, cfg.input_size, seed=batch)
        calls = {name: (lambda b=b: b.logits(crops)) for name, b in backends.items()}
        timings = time_interleaved(calls, warmup=warmup, repeats=repeats)
        # one single-threaded call per core at once (a CPU replica's `cpu_runs`; `cores`
        # batches per timed call)
        timings["ort_calls_per_core"] = time_calls_per_core(lambda: one_thread.logits(crops), cores,
                                                            warmup=warmup, repeats=repeats)
        per_batch.append({"batch": batch, "cores": cores,
                          **{name: t.as_dict() for name, t in timings.items()}})
        log(f"{label} batch {batch}: eager {timings['torch'].median:.3f} s, "
            f"ORT {timings['onnxruntime'].median:.3f} s, {cores} one-thread ORT calls "
            f"{timings['ort_calls_per_core'].median:.3f} s (median of {repeats})")
    return {"config": label, "backbone": cfg.backbone, "input_size": cfg.input_size,
            "gflops_per_face": flops, "onnx_export_s": export_s,
            "max_abs_logit_diff": logit_diff, "batches": per_batch}


def derive_rows(models: Sequence[dict[str, Any]], roofline_gflops: float) -> list[dict[str, Any]]:
    """One flat row per (config, batch): faces/s, speed-up, fraction of the roofline."""
    rows = []
    for m in models:
        for b in m["batches"]:
            row: dict[str, Any] = {"config": m["config"], "gflops_per_face": m["gflops_per_face"],
                                   "batch": b["batch"]}
            for key, name in (("torch", "torch"), ("ort", "onnxruntime")):
                fps = b["batch"] / b[name]["median_s"]
                row[f"{key}_median_s"] = b[name]["median_s"]
                row[f"{key}_min_s"] = b[name]["min_s"]
                row[f"{key}_faces_per_s"] = fps
                row[f"{key}_roofline_fraction"] = fps * m["gflops_per_face"] / roofline_gflops
                row[f"{key}_roofline_pct"] = 100 * row[f"{key}_roofline_fraction"]
            row["speedup"] = b["torch"]["median_s"] / b["onnxruntime"]["median_s"]
            if "ort_calls_per_core" in b:
                fps = b["cores"] * b["batch"] / b["ort_calls_per_core"]["median_s"]
                row["ort_calls_faces_per_s"] = fps
                row["ort_calls_roofline_fraction"] = fps * m["gflops_per_face"] / roofline_gflops
                row["ort_calls_roofline_pct"] = 100 * row["ort_calls_roofline_fraction"]
            rows.append(row)
    return rows


def run_benchmark(configs: Sequence[str] = DEFAULT_CONFIGS, batches: Sequence[int] = DEFAULT_BATCHES,
                  warmup: int = 1, repeats: int = 3, gemm_n: int = 2048,
                  workdir: Path | None = None,
                  log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
                  ) -> dict[str, Any]:
    """The whole benchmark; returns a JSON-ready dict (machine, roofline, models, rows).

    The sgemm rate (torch's and numpy's) is measured before and after the model timings; the
    best of all four is the roofline.
    """
    cfgs = [parse_spec(c) for c in configs]
    if not cfgs:
        raise ValueError("no model configs to benchmark")
    if not batches or any(b < 1 for b in batches):
        raise ValueError(f"batch sizes must be >= 1, got {list(batches)}")
    started = time.perf_counter()
    machine = machine_info()
    before = roofline(gemm_n)
    log(f"sgemm {gemm_n}: torch {before['torch_sgemm_gflops']:.1f} GFLOP/s, "
        f"numpy {before['numpy_sgemm_gflops']:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory(prefix="pel-bench-") as tmp:
        out_dir = Path(workdir) if workdir is not None else Path(tmp)
        models = [bench_model(cfg, batches, warmup, repeats, out_dir, log) for cfg in cfgs]
    after = roofline(gemm_n)
    roof = {"gemm_n": gemm_n, "before": before, "after": after,
            "torch_sgemm_gflops": max(before["torch_sgemm_gflops"], after["torch_sgemm_gflops"]),
            "numpy_sgemm_gflops": max(before["numpy_sgemm_gflops"], after["numpy_sgemm_gflops"])}
    roof["sgemm_gflops"] = max(roof["torch_sgemm_gflops"], roof["numpy_sgemm_gflops"])  # the roofline
    return {"machine": machine,
            "settings": {"configs": [_label(c) for c in cfgs], "batches": list(batches),
                         "warmup": warmup, "repeats": repeats, "precision": "fp32", "device": "cpu"},
            "roofline": roof, "models": models,
            "rows": derive_rows(models, roof["sgemm_gflops"]),
            "total_s": time.perf_counter() - started}


def render(result: dict[str, Any]) -> str:
    """Markdown: roofline line, then the table."""
    r, m = result["roofline"], result["machine"]
    head = (f"Machine: {m['cpu_model']}, {m['nproc']} CPUs, torch {m['torch']} "
            f"({m['torch_threads']} threads), onnxruntime {m['onnxruntime']}. "
            f"Roofline: sgemm {r['gemm_n']}^3 = {r['sgemm_gflops']:.1f} GFLOP/s, the faster of torch "
            f"({r['torch_sgemm_gflops']:.1f}) and numpy ({r['numpy_sgemm_gflops']:.1f}).")
    return head + "\n\n" + markdown_table(result["rows"], TABLE_COLUMNS)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", type=lambda s: [c for c in s.split(",") if c.strip()],
                   help=f"comma-separated EfficientNet@px specs (default {','.join(DEFAULT_CONFIGS)})")
    p.add_argument("--batches", type=_ints, help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--warmup", type=int, help="warm-up calls per backend and batch (default 1)")
    p.add_argument("--repeats", type=int, help="timed repetitions per backend and batch (default 3)")
    p.add_argument("--gemm-n", type=int, help="matrix size of the sgemm roofline (default 2048)")
    p.add_argument("--quick", action="store_true", help="smoke test: b0@96, batches 1,2, one repetition")
    p.add_argument("--workdir", type=Path, help="keep the ONNX exports here (default: a temp dir)")
    p.add_argument("--out", type=Path, help="write the full results as JSON here")
    args = p.parse_args(argv)
    base = dict(QUICK) if args.quick else {"configs": DEFAULT_CONFIGS, "batches": DEFAULT_BATCHES,
                                           "warmup": 1, "repeats": 3, "gemm_n": 2048}
    for key in base:
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    result = run_benchmark(workdir=args.workdir, **base)
    print(render(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
