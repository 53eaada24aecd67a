"""`pel export` and `pel info`: turn a checkpoint into the artefacts the service loads."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def _profile(text: str) -> tuple[int, int, int]:
    from .engine_cache import validate_profile

    try:
        lo, opt, hi = (int(v) for v in text.split(","))
        return validate_profile((lo, opt, hi))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--profile takes MIN,OPT,MAX batch sizes ({exc})") from exc


def _export(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint, read_meta
    from .export import export_onnx
    from .quantize import convert_fp16, load_calibration_crops, quantize_int8

    precision = args.precision or ("fp16" if args.trt else "fp32")
    if precision == "int8" and args.calibration_dir is None:
        raise ValueError("--precision int8 needs --calibration-dir: a `pel prepare` output "
                         "(its val split) or a folder of face crop images")
    from .config import DetectorConfig
    from .scorer import onnx_artifact

    if args.for_service:  # where replicas look for it: they then start without exporting
        out = onnx_artifact(DetectorConfig(checkpoint=args.checkpoint, artifacts_dir=args.artifacts_dir))
    else:
        out = Path(args.output or Path(args.checkpoint).with_suffix(".onnx"))
    meta = read_meta(args.checkpoint)
    size = meta.model.input_size
    calib = load_calibration_crops(args.calibration_dir, size) if precision == "int8" else None
    if not (args.for_service and out.exists()):  # cached under the checkpoint's digest
        export_onnx(load_checkpoint(args.checkpoint)[0], out)
    result = {"onnx": str(out), "backbone": meta.model.backbone, "input_size": size}
    if precision == "fp16":
        result["onnx_fp16"] = str(convert_fp16(out, out.with_suffix(".fp16.onnx")))
    elif precision == "int8":  # the CPU (ONNX Runtime) Q/DQ graph
        result["onnx_int8"] = str(quantize_int8(out, out.with_suffix(".int8.onnx"), calib,
                                                keep_float=args.int8_keep_float))
    if args.trt:  # built where the service looks for it (same ONNX file, same cache key)
        from .backends.tensorrt_backend import build_engine

        served = onnx_artifact(DetectorConfig(checkpoint=args.checkpoint, model=meta.model,
                                              artifacts_dir=args.artifacts_dir))
        if not served.exists():
            served.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out, served)
        result["tensorrt_engine"] = str(build_engine(served, size, precision, profile=args.profile,
                                                     calibration_crops=calib,
                                                     keep_float=tuple(args.int8_keep_float)))
    print(json.dumps(result))
    return 0


def _info(args: argparse.Namespace) -> int:
    from .checkpoint import read_meta

    print(read_meta(args.checkpoint).to_json())
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from .config import DEFAULT_CHECKPOINT, DetectorConfig

    p = sub.add_parser("export", help="export a checkpoint to ONNX (FP16/INT8 graphs, TensorRT with --trt)")
    p.add_argument("checkpoint", nargs="?", type=Path, default=DEFAULT_CHECKPOINT,
                   help="a trained checkpoint (default: the shipped model)")
    p.add_argument("-o", "--output", help="ONNX path (default: beside the checkpoint)")
    p.add_argument("--for-service", action="store_true",
                   help="write the ONNX where the service's replicas load it (--artifacts-dir), "
                        "so they start in seconds instead of exporting at start")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"],
                   help="also write this precision's graph (<output>.fp16.onnx or the Q/DQ "
                        "<output>.int8.onnx); with --trt, the engine's precision (default fp16)")
    p.add_argument("--calibration-dir", type=Path, metavar="DIR",
                   help="INT8 calibration crops: a `pel prepare` output (val split) or face images")
    p.add_argument("--int8-keep-float", nargs="+", default=(), metavar="PREFIX",
                   help="INT8: weight-name prefixes of layers kept in float (e.g. rgb.blocks.6)")
    p.add_argument("--trt", action="store_true", help="also build a TensorRT engine (needs a GPU)")
    p.add_argument("--profile", type=_profile, default=DetectorConfig().tensorrt_profile,
                   metavar="MIN,OPT,MAX", help="TensorRT batch profile (default: the service's, "
                   "1,max_batch_size/2,max_batch_size)")
    p.add_argument("--artifacts-dir", type=Path, default=DetectorConfig().artifacts_dir,
                   help="the service's artifacts_dir, where --trt puts the engine")
    p.set_defaults(func=_export)
    p = sub.add_parser("info", help="print a checkpoint's metadata")
    p.add_argument("checkpoint")
    p.set_defaults(func=_info)
