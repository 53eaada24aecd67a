"""Shared helpers for the benchmarks: fair timing, FLOP counting, the machine's matmul roofline,
machine description and markdown tables.

Conventions used by every benchmark in `bench/`:
- times are wall-clock seconds per call (`time.perf_counter`), after warm-up;
- competing variants are timed interleaved (one call of each per repetition, in rotating order),
  so that load from other processes on a shared machine hits all of them alike;
- a FLOP is one multiply or one add (a multiply-accumulate counts 2), as in
  `torch.utils.flop_counter.FlopCounterMode`.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one variant, one entry per repetition."""

    seconds: tuple[float, ...]
    runs: int = field(init=False)

    def __post_init__(self) -> None:
        if not self.seconds:
            raise ValueError("a Timing needs at least one measurement")
        object.__setattr__(self, "runs", len(self.seconds))

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)

    def as_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "min_s": self.min, "runs": self.runs,
                "seconds": list(self.seconds)}


def time_interleaved(variants: Mapping[str, Callable[[], object]], warmup: int = 1,
                     repeats: int = 3) -> dict[str, Timing]:
    """Time each zero-argument callable `repeats` times, interleaved, after `warmup` calls each.

    Repetition r calls the variants in an order rotated by r, so that no variant is always first
    (or always right after another one that heats the caches or the CPU frequency).
    """
    if not variants:
        raise ValueError("no variants to time")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            variants[name]()
            seconds[name].append(time.perf_counter() - start)
    return {name: Timing(tuple(s)) for name, s in seconds.items()}


def time_calls_per_core(call: Callable[[], object], cores: int, warmup: int = 1, repeats: int = 3,
                        settle_s: float = 1.0) -> Timing:
    """Time `cores` concurrent runs of `call` (one single-threaded model call per core, as a CPU
    replica with `cpu_runs` calls at once uses them), on their own after `settle_s` of quiet.

    Never interleave this with an all-core ONNX Runtime session: that session's pool threads spin
    for a while after each of its calls and take the cores from whatever runs next
    (docs/benchmarks.md, the roofline section).
    """
    if cores < 1:
        raise ValueError(f"need cores >= 1, got {cores}")
    time.sleep(settle_s)
    with ThreadPoolExecutor(cores) as pool:
        def at_once() -> list:
            return list(pool.map(lambda _: call(), range(cores)))
        return time_interleaved({"calls_per_core": at_once}, warmup=warmup, repeats=repeats)["calls_per_core"]


def count_flops(module: torch.nn.Module, *inputs: Any) -> int:
    """FLOPs of one forward pass (2 per multiply-accumulate of convolutions and matmuls)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops())


def torch_gemm_gflops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32,
                      device: str = "cpu") -> float:
    """Best GFLOP/s of an n x n x n torch matmul (on CPU with torch's own thread count)."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    out = torch.empty(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def mm() -> None:
        torch.mm(a, b, out=out)
        sync()

    mm()  # warm-up: thread pool, page faults, kernel selection
    best = min(_timed(mm) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def numpy_gemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of an n x n x n float32 numpy matmul (numpy's BLAS), for reference."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=out)
    best = min(_timed(lambda: np.matmul(a, b, out=out)) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What a reader needs to interpret the figures: date, CPUs, library versions, threads."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info


def face_crops(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Realistic uint8 face crops (N, size, size, 3): the astronaut photo's face, jittered, noisy."""
    from PIL import Image
    from skimage import data

    if n < 1 or size < 1:
        raise ValueError(f"need n >= 1 and size >= 1, got {n} and {size}")
    rng = np.random.default_rng(seed)
    face = data.astronaut()[0:220, 140:330]
    crops = []
    for _ in range(n):
        y, x = rng.integers(0, 20, 2)
        img = np.asarray(Image.fromarray(face[y:y + 200, x:x + 170]).resize((size, size)))
        noisy = img.astype(np.int16) + rng.integers(-20, 21, img.shape)
        crops.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return np.stack(crops)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Rows of dicts -> markdown table; `columns` is (key, header) pairs. Floats get 3 significant
    digits (one decimal from 100 up)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(row.get(k)) for k, _ in columns) + " |" for row in rows]
    return "\n".join(lines)
