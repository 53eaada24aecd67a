"""PEL inference on one GPU: faces/s and latency per batch size for every available backend and
precision, against the GPU's own matrix-multiply rate, in one run of a few minutes.

    python -m bench.bench_gpu --out $OUT                       # b4@320, batches 1,8,32,128 on CUDA
    python -m bench.bench_gpu --out $OUT --compile             # also torch.compile (fp16)
    python -m bench.bench_gpu --device cpu --quick --out /tmp/g   # CPU dry run (b0@96, batches 1,2)

Variants: PyTorch eager fp32/fp16/bf16 (`TorchBackend`: channels-last, uint8 crops pinned and
normalised on the GPU), torch.compile (opt-in), ONNX Runtime (CUDA provider when installed; CPU in
the dry run), TensorRT fp16/int8 (when the `trt` extra is installed). Unavailable variants are
listed with the reason. Roofline: the best rate of a square torch.matmul per dtype (fp32 with TF32
off, TF32, fp16, bf16). Latency = median wall time of one `Backend.logits` call (host uint8 in,
host float out), faces/s = batch / latency. Results: `bench_gpu.json` and `bench_gpu.md` in --out.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .bench_model import _ints, build_model, parse_spec
from .common import count_flops, face_crops, machine_info, markdown_table, torch_gemm_gflops

BUDGET_S = 270.0  # the whole run stays under five minutes
COLUMNS = [("variant", "variant"), ("batch", "batch"), ("latency_ms", "latency ms (median)"),
           ("faces_per_s", "faces/s"), ("roofline_pct", "% of matmul roofline"), ("note", "note")]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_rate(device: str, dtype: torch.dtype, n: int, tf32: bool = False, reps: int = 10) -> float:
    """Best TFLOP/s of an n x n x n torch matmul, with TF32 on or off for float32."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        return torch_gemm_gflops(n, reps, dtype, device) / 1e3
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def roofline(device: str, quick: bool) -> dict[str, dict[str, Any]]:
    cuda = device.startswith("cuda")
    n = 8192 if cuda and not quick else 1024 if cuda else 512
    plan = [("fp32", torch.float32, False)]
    if cuda:
        plan += [("tf32", torch.float32, True), ("fp16", torch.float16, False),
                 ("bf16", torch.bfloat16, False)]
    return {name: {"tflops": matmul_rate(device, dt, n, tf32), "n": n} for name, dt, tf32 in plan}


def time_backend(run: Callable[[], object], device: str, min_s: float, max_reps: int) -> list[float]:
    """Two warm-up calls, then timed calls until `min_s` seconds or `max_reps` calls."""
    for _ in range(2):
        run()
    times: list[float] = []
    while len(times) < 3 or (sum(times) < min_s and len(times) < max_reps):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def variants(model_factory: Callable[[], Any], onnx_path: Callable[[], Path], device: str,
             compile_: bool, calibration: np.ndarray) -> list[tuple[str, str, str, Callable[[], Any] | str]]:
    """(variant, backend, precision, factory or reason it is unavailable)."""
    from pel_model.backends import OnnxRuntimeBackend, TorchBackend

    cuda = device.startswith("cuda")
    out: list[tuple[str, str, str, Callable[[], Any] | str]] = []
    for prec in ("fp32", "fp16", "bf16"):
        if prec == "fp32" or cuda:
            out.append((f"torch-{prec}", "torch", prec,
                        lambda p=prec: TorchBackend(model_factory(), device, p)))
        else:
            out.append((f"torch-{prec}", "torch", prec, f"{prec} needs CUDA"))
    if compile_ and cuda:
        out.append(("torch-fp16-compile", "torch", "fp16",
                    lambda: TorchBackend(model_factory(), device, "fp16", compile="max-autotune")))
    else:
        out.append(("torch-fp16-compile", "torch", "fp16",
                    "opt-in (--compile)" if cuda else "torch.compile variant is GPU only"))
    import onnxruntime as ort
    has_cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    if cuda and not has_cuda_ep:
        out.append(("onnxruntime-fp32", "onnxruntime", "fp32",
                    "onnxruntime-gpu not installed (no CUDAExecutionProvider)"))
    else:
        out.append(("onnxruntime-fp32", "onnxruntime", "fp32",
                    lambda: OnnxRuntimeBackend(onnx_path(), model_factory().cfg.input_size, device)))
    try:
        import tensorrt  # noqa: F401
        trt_reason = None if cuda else "TensorRT needs CUDA"
    except ImportError:
        trt_reason = "tensorrt not installed (pip install 'pel-moderation[trt]')"
    for prec in ("fp16", "int8"):
        if trt_reason:
            out.append((f"tensorrt-{prec}", "tensorrt", prec, trt_reason))
            continue

        def make(p: str = prec) -> Any:
            from pel_model.backends.tensorrt_backend import TensorRTBackend
            return TensorRTBackend.from_model(model_factory(), onnx_path(), device, p,
                                              profile=(1, 32, 128), calibration_crops=calibration)
        out.append((f"tensorrt-{prec}", "tensorrt", prec, make))
    return out


def run(config: str, batches: Sequence[int], device: str, quick: bool, compile_: bool,
        budget_s: float, log: Callable[[str], None]) -> dict[str, Any]:
    started = time.perf_counter()
    deadline = started + budget_s
    cfg = parse_spec(config)
    machine = machine_info()
    if device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(0)
        machine["compute_capability"] = list(torch.cuda.get_device_capability(0))
        machine["cuda"] = torch.version.cuda
    roof = roofline(device, quick)
    log("matmul roofline: " + ", ".join(f"{k} {v['tflops']:.1f} TFLOP/s" for k, v in roof.items()))
    base = build_model(cfg)
    gflops = count_flops(base, torch.from_numpy(face_crops(1, cfg.input_size))) / 1e9
    calibration = face_crops(32, cfg.input_size, seed=7)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pel-gpu-bench-") as tmp:
        onnx_file = Path(tmp) / "pel.onnx"

        def onnx_path() -> Path:
            if not onnx_file.exists():
                from pel_model.export import export_onnx
                export_onnx(base, onnx_file)
            return onnx_file

        def fresh_model() -> Any:  # each backend moves/casts its model: give each its own copy
            import copy
            return copy.deepcopy(base)

        for name, backend_kind, prec, factory in variants(fresh_model, onnx_path, device,
                                                          compile_, calibration):
            row0 = {"variant": name, "backend": backend_kind, "precision": prec}
            if isinstance(factory, str):
                rows.append({**row0, "note": factory})
                log(f"{name}: skipped ({factory})")
                continue
            if time.perf_counter() > deadline:
                rows.append({**row0, "note": "skipped: time budget spent"})
                continue
            try:
                t0 = time.perf_counter()
                backend = factory()
                setup_s = time.perf_counter() - t0
                for batch in batches:
                    if time.perf_counter() > deadline:
                        rows.append({**row0, "batch": batch, "note": "skipped: time budget spent"})
                        continue
                    crops = face_crops(batch, cfg.input_size, seed=batch)
                    times = time_backend(functools.partial(backend.logits, crops), device,
                                         0.2 if quick else 1.0, 5 if quick else 50)
                    lat = statistics.median(times)
                    roof_key = {"fp32": "tf32" if device.startswith("cuda") else "fp32",
                                "int8": "fp16"}.get(prec, prec)
                    fps = batch / lat
                    rows.append({**row0, "batch": batch, "latency_ms": 1e3 * lat, "faces_per_s": fps,
                                 "min_ms": 1e3 * min(times), "runs": len(times),
                                 "roofline_pct": 100 * fps * gflops / 1e3 / roof[roof_key]["tflops"],
                                 "roofline": roof_key, "setup_s": setup_s,
                                 "note": backend.describe()})
                    log(f"{name} batch {batch}: {1e3 * lat:.2f} ms, {fps:.1f} faces/s")
                del backend
            except Exception as exc:  # one failing backend must not lose the others' figures
                rows.append({**row0, "note": f"failed: {type(exc).__name__}: {exc}"[:300]})
                log(f"{name}: FAILED\n{traceback.format_exc()}")
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return {"machine": machine,
            "settings": {"config": config, "batches": list(batches), "device": device,
                         "quick": quick, "compile": compile_, "budget_s": budget_s},
            "gflops_per_face": gflops, "roofline": roof, "rows": rows,
            "total_s": time.perf_counter() - started}


def render(result: dict[str, Any]) -> str:
    m, r = result["machine"], result["roofline"]
    head = (f"Device: {m.get('gpu', m['cpu_model'])}, torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
            f"{m['date']}. Model {result['settings']['config']}: {result['gflops_per_face']:.2f} "
            "GFLOPs/face. Matmul roofline (TFLOP/s): "
            + ", ".join(f"{k} {v['tflops']:.1f}" for k, v in r.items()) + ".")
    return head + "\n\n" + markdown_table(result["rows"], COLUMNS) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for bench_gpu.json and bench_gpu.md")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--config", default=None, help="EfficientNet@px (default b4@320; quick: b0@96)")
    p.add_argument("--batches", type=_ints, default=None, help="default 1,8,32,128 (quick: 1,2)")
    p.add_argument("--quick", action="store_true", help="small model, few batches, short timings")
    p.add_argument("--dry-run", action="store_true", help="= --device cpu --quick")
    p.add_argument("--compile", action="store_true", help="add a torch.compile variant (minutes)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="stop starting new work after this")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.quick = "cpu", True
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is available (use --device cpu --quick)")
    config = args.config or ("b0@96" if args.quick else "b4@320")
    batches = args.batches or ([1, 2] if args.quick else [1, 8, 32, 128])
    result = run(config, batches, device, args.quick, args.compile, args.budget_s,
                 lambda msg: print(msg, file=sys.stderr, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "bench_gpu.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
