"""The 3x3 median filter: sorted columns (`pel_model.layers.median`, since 2026-12-07) vs the
19-exchange median-of-9 network it replaced (Paeth), per layer and in the whole model, one run.

    python -m bench.bench_median                      # the shipped model, batch 8, 2 threads
    python -m bench.bench_median --threads 1          # the CPU replica's thread budget
    python -m bench.bench_median --quick              # random lite0@64, batch 2, one repetition

Layers: every tensor the model median-filters (noise enhancement of both streams, and the input
prefilter when `input_median` is on) at its real shape, timed in PyTorch eager and as a one-node
ONNX Runtime graph. Model: the model exported twice, once per median, both through the
service's `OnnxRuntimeBackend`; both graphs must give the same logits. Training: one eager
forward and backward pass per median. Interleaved repetitions, median seconds.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from pel_model.backends import OnnxRuntimeBackend
from pel_model.export import export_onnx
from pel_model.layers import NoiseEnhancement, median3x3

from .common import face_crops, machine_info, markdown_table, time_interleaved

# The network shipped until 2026-12-07 (Paeth, Graphics Gems, 1990): 19 compare-exchanges over
# the 9 shifted views; element 4 ends as the median.
_PAETH = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8),
          (0, 3), (5, 8), (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))
_PATCH_SITES = ("pel_model.layers.noise_enhancement.median3x3", "pel_model.pel.median3x3")


def paeth_median3x3(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    v = [p[..., i:i + h, j:j + w] for i in range(3) for j in range(3)]
    for a, b in _PAETH:
        v[a], v[b] = torch.minimum(v[a], v[b]), torch.maximum(v[a], v[b])
    return v[4]


MEDIANS = {"sorted_columns": median3x3, "paeth_network": paeth_median3x3}


class _Filter(torch.nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def filtered_shapes(model: torch.nn.Module, batch: int) -> list[tuple[int, ...]]:
    """Shapes of the tensors `model` median-filters in one forward pass of `batch` crops."""
    shapes: list[tuple[int, ...]] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
             for m in model.modules() if isinstance(m, NoiseEnhancement)]
    s = model.cfg.input_size
    with torch.no_grad():
        model(torch.from_numpy(face_crops(batch, s)))
    for h in hooks:
        h.remove()
    return ([(batch, 3, s, s)] if model.cfg.input_median else []) + shapes


def _ort_session(fn, x: torch.Tensor, path: Path, threads: int):
    import onnxruntime as ort

    torch.onnx.export(_Filter(fn).eval(), (x,), str(path), input_names=["x"], output_names=["y"],
                      opset_version=18, dynamo=True, external_data=False, verbose=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def bench_layers(shapes, threads: int, warmup: int, repeats: int, workdir: Path, log) -> list[dict]:
    rows = []
    for i, shape in enumerate(shapes):
        x = torch.randn(shape)
        assert torch.equal(median3x3(x), paeth_median3x3(x))
        variants = {}
        for name, fn in MEDIANS.items():
            variants[f"eager/{name}"] = (lambda fn=fn: fn(x))
            sess = _ort_session(fn, x, workdir / f"layer{i}-{name}.onnx", threads)
            variants[f"ort/{name}"] = (lambda sess=sess: sess.run(None, {"x": x.numpy()}))
        t = time_interleaved(variants, warmup=warmup, repeats=repeats)
        row: dict[str, Any] = {"shape": "x".join(map(str, shape))}
        for k in ("eager", "ort"):
            new, old = t[f"{k}/sorted_columns"].median, t[f"{k}/paeth_network"].median
            row.update({f"{k}_new_ms": 1e3 * new, f"{k}_old_ms": 1e3 * old, f"{k}_speedup": old / new})
        rows.append(row)
        log(f"{row['shape']}: eager {row['eager_speedup']:.2f}x, ORT {row['ort_speedup']:.2f}x")
    return rows


def bench_whole_model(model, batch: int, threads: int, warmup: int, repeats: int, workdir: Path,
                      log) -> dict[str, Any]:
    backends = {}
    for name, fn in MEDIANS.items():
        with mock.patch(_PATCH_SITES[0], fn), mock.patch(_PATCH_SITES[1], fn):
            path = export_onnx(model, workdir / f"model-{name}.onnx")
        backends[name] = OnnxRuntimeBackend(path, model.cfg.input_size, threads=threads)
    crops = face_crops(batch, model.cfg.input_size, seed=batch)
    logits = {name: b.logits(crops) for name, b in backends.items()}
    diff = float(np.max(np.abs(logits["sorted_columns"] - logits["paeth_network"])))
    t = time_interleaved({n: (lambda b=b: b.logits(crops)) for n, b in backends.items()},
                         warmup=warmup, repeats=repeats)
    new, old = t["sorted_columns"].median, t["paeth_network"].median
    out = {"batch": batch, "threads": threads, "max_abs_logit_diff": diff,
           "new_faces_per_s": batch / new, "old_faces_per_s": batch / old, "speedup": old / new,
           "timings": {n: v.as_dict() for n, v in t.items()}}
    log(f"model, batch {batch}, {threads} threads: {out['old_faces_per_s']:.1f} -> "
        f"{out['new_faces_per_s']:.1f} faces/s ({out['speedup']:.2f}x), logits differ by {diff:.1e}")
    return out


def bench_train_step(model, batch: int, warmup: int, repeats: int, log) -> dict[str, Any]:
    """One eager training step (forward and backward of `batch` crops, every parameter
    trainable, no optimiser) per median: what the CPU training recipe pays per batch."""
    crops = torch.from_numpy(face_crops(batch, model.cfg.input_size, seed=7))
    target = torch.arange(batch, dtype=torch.float32) % 2

    def step(fn):
        with mock.patch(_PATCH_SITES[0], fn), mock.patch(_PATCH_SITES[1], fn):
            model.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(model(crops), target).backward()

    model.train()
    try:
        t = time_interleaved({n: (lambda fn=fn: step(fn)) for n, fn in MEDIANS.items()},
                             warmup=warmup, repeats=repeats)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    new, old = t["sorted_columns"].median, t["paeth_network"].median
    out = {"batch": batch, "new_s": new, "old_s": old, "speedup": old / new,
           "timings": {n: v.as_dict() for n, v in t.items()}}
    log(f"training step, batch {batch}: {old:.3f} -> {new:.3f} s ({out['speedup']:.2f}x)")
    return out


def _model(quick: bool):
    if quick:
        from .bench_model import build_model, parse_spec

        return build_model(parse_spec("lite0@64+median"), calibration_batch=2), "random lite0@64+median"
    from pel_model.checkpoint import file_digest, load_checkpoint
    from pel_model.config import DEFAULT_CHECKPOINT

    model, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    return model.eval(), f"{DEFAULT_CHECKPOINT.name}@{file_digest(DEFAULT_CHECKPOINT)}"


LAYER_COLUMNS = [("shape", "filtered tensor (N x C x H x W)"),
                 ("eager_old_ms", "eager, Paeth (ms)"), ("eager_new_ms", "eager, sorted columns (ms)"),
                 ("eager_speedup", "eager speed-up"), ("ort_old_ms", "ORT, Paeth (ms)"),
                 ("ort_new_ms", "ORT, sorted columns (ms)"), ("ort_speedup", "ORT speed-up")]


def run(quick: bool = False, batch: int = 8, threads: int = 2, warmup: int = 1, repeats: int = 5,
        log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> dict[str, Any]:
    if quick:
        batch, warmup, repeats = 2, 1, 1
    torch.set_num_threads(threads)
    model, label = _model(quick)
    shapes = filtered_shapes(model, batch)
    with tempfile.TemporaryDirectory(prefix="pel-median-") as tmp:
        layers = bench_layers(shapes, threads, warmup, repeats, Path(tmp), log)
        whole = bench_whole_model(model, batch, threads, warmup, repeats, Path(tmp), log)
    train = bench_train_step(model, batch, warmup, repeats, log)
    return {"machine": machine_info(), "model": label,
            "settings": {"batch": batch, "threads": threads, "warmup": warmup, "repeats": repeats},
            "layers": layers, "model_onnxruntime": whole, "train_step_eager": train}


def render(result: dict[str, Any]) -> str:
    w, t = result["model_onnxruntime"], result["train_step_eager"]
    return (markdown_table(result["layers"], LAYER_COLUMNS) + "\n\n"
            f"Whole model ({result['model']}, ONNX Runtime, batch {w['batch']}, {w['threads']} threads): "
            f"{w['old_faces_per_s']:.2f} -> {w['new_faces_per_s']:.2f} faces/s = {w['speedup']:.2f}x; "
            f"logits differ by at most {w['max_abs_logit_diff']:.1e}.\n\n"
            f"Training step (eager forward + backward, batch {t['batch']}): {t['old_s']:.3f} -> "
            f"{t['new_s']:.3f} s = {t['speedup']:.2f}x.")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_median", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="random lite0@64, batch 2, one repetition")
    p.add_argument("--out", type=Path, help="write the JSON result here")
    args = p.parse_args(argv)
    if args.batch < 1 or args.threads < 1 or args.repeats < 1:
        p.error("--batch, --threads and --repeats must be >= 1")
    result = run(args.quick, args.batch, args.threads, repeats=args.repeats)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
