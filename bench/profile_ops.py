"""Where an ONNX Runtime CPU session of the model spends its time, by kind of operator, next to
each kind's share of the FLOPs: shows whether the model is bound by dense compute (the sgemm
roofline applies) or by memory traffic (depthwise convolutions, element-wise ops).

    python -m bench.profile_ops [--onnx PATH] [--batch 8] [--runs 10] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from pel_model.config import DetectorConfig
from pel_model.scorer import onnx_artifact


def conv_kind(node, inits) -> str:
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return "Conv (depthwise)" if group > 1 else "Conv (dense)"


def conv_flops(node, shapes, inits) -> float:
    """2 x MACs of a Conv from its weight and output shapes."""
    w = inits.get(node.input[1])
    out = shapes.get(node.output[0])
    if w is None or out is None or len(out) != 4:
        return 0.0
    cout, cin_g, kh, kw = w.dims
    n, _, h, wd = out
    return 2.0 * n * cout * h * wd * cin_g * kh * kw


def main() -> None:
    import onnx
    import onnxruntime as ort
    from onnx import shape_inference

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--onnx", help="default: the service's cached export of the shipped model "
                                  "(`pel export --for-service` writes it)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    path = Path(args.onnx) if args.onnx else onnx_artifact(DetectorConfig())
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: run `pel export --for-service` (or pass --onnx)")
    path = str(path)
    model = onnx.load(path)
    size = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value or 224
    inferred = shape_inference.infer_shapes(model)
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = [d.dim_value if d.dim_value else args.batch for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    inits = {i.name: i for i in model.graph.initializer}
    kind_of, flops = {}, defaultdict(float)
    for node in model.graph.node:
        kind = conv_kind(node, inits) if node.op_type == "Conv" else node.op_type
        kind_of[node.name] = kind
        if node.op_type == "Conv":
            flops[kind] += conv_flops(node, shapes, inits)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).integers(0, 255, (args.batch, size, size, 3), dtype=np.uint8)
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x})  # warm-up (its events are dropped below)
    events = json.loads(Path(sess.end_profiling()).read_text())
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    for _ in range(args.runs):
        sess.run(None, {name: x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    time_us = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node, a = e["name"][: -len("_kernel_time")], e.get("args", {})
            kind = kind_of.get(node) or a.get("op_name", "?")
            if "Conv" in kind and kind not in flops:  # a fused node: tell by its weight's shape
                w = [d for d in a.get("input_type_shape", [])[1:2] for d in d.values()]
                kind = "Conv (depthwise)" if w and len(w[0]) == 4 and w[0][1] == 1 else "Conv (dense)"
            time_us[kind] += e["dur"]
    total_t, total_f = sum(time_us.values()), sum(flops.values())
    print(f"{path}: batch {args.batch}, {args.threads} threads, {args.runs} runs; "
          f"Conv FLOPs {total_f / args.batch / 1e9:.2f} G/face")
    print("| operator | share of time | share of Conv FLOPs |")
    print("|---|---|---|")
    for kind, t in sorted(time_us.items(), key=lambda kv: -kv[1])[:10]:
        share_f = f"{100 * flops[kind] / total_f:.1f} %" if kind in flops else "-"
        print(f"| {kind} | {100 * t / total_t:.1f} % | {share_f} |")


if __name__ == "__main__":
    main()
