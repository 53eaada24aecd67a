"""`pel export` and `pel info`: turn a checkpoint into the artefacts the service loads."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _export(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .export import export_onnx

    model, meta = load_checkpoint(args.checkpoint)
    out = Path(args.output or Path(args.checkpoint).with_suffix(".onnx"))
    export_onnx(model, out)
    print(json.dumps({"onnx": str(out), "backbone": meta.model.backbone,
                      "input_size": meta.model.input_size}))
    if args.trt:
        from .backends.tensorrt_backend import build_engine
        engine = build_engine(out, meta.model.input_size, precision=args.precision)
        print(json.dumps({"tensorrt_engine": str(engine)}))
    return 0


def _info(args: argparse.Namespace) -> int:
    from .checkpoint import read_meta

    print(read_meta(args.checkpoint).to_json())
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX (and TensorRT with --trt)")
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", help="ONNX path (default: beside the checkpoint)")
    p.add_argument("--trt", action="store_true", help="also build a TensorRT engine (needs a GPU)")
    p.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "int8"])
    p.set_defaults(func=_export)
    p = sub.add_parser("info", help="print a checkpoint's metadata")
    p.add_argument("checkpoint")
    p.set_defaults(func=_info)
