"""Reduced-precision ONNX graphs for compiled inference: FP16 and INT8 (explicit Q/DQ).

Both keep the service's input contract (`crops` uint8 NHWC in, `logits` float32 out), so every
backend that loads an ONNX graph can run them unchanged. TensorRT 11 builds only strongly typed
networks, where precision comes from the graph itself: FP16 = an FP16 graph, INT8 = Q/DQ nodes.

- `convert_fp16`: every float tensor (weights, activations, the input Cast) becomes float16; a
  final Cast returns float32 logits.
- `quantize_int8`: ONNX Runtime static quantisation in QDQ format, calibrated on real face crops.
  The "front end" (uint8 -> float Cast, RGB normalisation, YCbCr, sliding DCT and the 1x1 conv
  reading the DCT coefficients) stays in float: the forgery cues live in small high-frequency
  DCT coefficients that an 8-bit grid spanning the DC term would round to zero.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .export import INPUT_NAME

log = logging.getLogger(__name__)
# Initialisers of the fixed frequency front end (`FrequencyInput`) carry this prefix.
FRONTEND_PREFIX = "freq_input."


def convert_fp16(src: str | Path, dst: str | Path) -> Path:
    """FP32 ONNX graph -> FP16 graph with the same uint8 input and a float32 output."""
    model = onnx.load(str(src))
    graph = model.graph
    if any(n.op_type == "If" or n.op_type == "Loop" or n.domain not in ("", "ai.onnx")
           for n in graph.node):
        raise ValueError(f"{src}: FP16 conversion supports flat standard-domain graphs only")
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            arr = numpy_helper.to_array(init)
            if np.abs(arr).max(initial=0.0) > np.finfo(np.float16).max:
                raise ValueError(f"initializer {init.name} overflows float16")
            init.CopyFrom(numpy_helper.from_array(arr.astype(np.float16), init.name))
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(
                    numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
            elif node.op_type in ("CastLike", "ConstantOfShape", "RandomNormal", "RandomUniform",
                                  "EyeLike") and attr.name == "dtype" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
    for vi in graph.value_info:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    # Outputs: the producer writes "<name>_fp16", a Cast restores the float32 output.
    for out in graph.output:
        if out.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        half = f"{out.name}_fp16"
        for node in graph.node:
            node.output[:] = [half if o == out.name else o for o in node.output]
            node.input[:] = [half if i == out.name else i for i in node.input]
        graph.node.append(helper.make_node("Cast", [half], [out.name], to=TensorProto.FLOAT,
                                           name=f"{out.name}_to_fp32"))
    for inp in graph.input:
        if inp.type.tensor_type.elem_type == TensorProto.FLOAT:
            raise ValueError(f"float input {inp.name!r}: the PEL graph takes uint8 crops")
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    log.info("FP16 graph written to %s", dst)
    return dst


def frontend_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes between the uint8 input and the first learned convolutions.

    Walks the (topologically sorted) graph from the input; a Conv whose weight is not part of the
    frequency front end ends the walk on its branch (it is quantised); everything before it is
    returned, including the DCT and the 1x1 conv that reads the DCT coefficients.
    """
    reached, names = {INPUT_NAME}, []
    for node in model.graph.node:
        if not any(i in reached for i in node.input):
            continue
        if node.op_type == "Conv" and not node.input[1].startswith(FRONTEND_PREFIX):
            continue
        names.append(node.name)
        reached.update(node.output)
    return names


class _CropReader:
    """CalibrationDataReader over uint8 crops in fixed-size batches (ORT's duck-typed protocol)."""

    def __init__(self, crops: np.ndarray, batch_size: int):
        # Equal batches (ORT's percentile collector stacks them): the last one wraps around.
        batch_size = min(batch_size, len(crops))
        short = -len(crops) % batch_size
        crops = np.concatenate([crops, crops[:short]]) if short else crops
        self._batches: Iterator[np.ndarray] = iter(
            [crops[i:i + batch_size] for i in range(0, len(crops), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch)}

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item

    def set_range(self, start_index: int, end_index: int) -> None:  # ORT API, unused here
        raise NotImplementedError


def _check_calibration(crops: np.ndarray, input_size: int | None) -> None:
    if not isinstance(crops, np.ndarray) or crops.dtype != np.uint8 or crops.ndim != 4 \
            or crops.shape[-1] != 3:
        raise ValueError("calibration crops must be a uint8 (N, S, S, 3) array of real face crops, got "
                         f"{getattr(crops, 'dtype', type(crops))} {getattr(crops, 'shape', '')}")
    if len(crops) < 8:
        raise ValueError(f"need at least 8 calibration crops, got {len(crops)}")
    if input_size is not None and crops.shape[1:3] != (input_size, input_size):
        raise ValueError(f"calibration crops are {crops.shape[1]}x{crops.shape[2]}, "
                         f"the graph takes {input_size}x{input_size}")
    if float(crops.std()) < 1.0:
        raise ValueError("calibration crops are (nearly) constant: use real face crops")


def _input_size(model: onnx.ModelProto) -> int | None:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return dims[1].dim_value or None if len(dims) == 4 else None


def quantize_int8(onnx_fp32_path: str | Path, out_path: str | Path, calibration_crops: np.ndarray,
                  per_channel: bool = True, *, target: Literal["cpu", "tensorrt"] = "cpu",
                  keep_frontend_float: bool = True, preprocess: bool = True,
                  batch_size: int = 8, op_types: Sequence[str] | None = ("Conv", "Gemm"),
                  calibrate_method: Literal["MinMax", "Percentile", "Entropy"] = "Percentile",
                  keep_float: Sequence[str] = ()) -> Path:
    """Static INT8 quantisation in QDQ format, calibrated on face crops of both classes
    (`load_calibration_crops`); percentile ranges by default (clipping rare outliers keeps the
    8-bit grid fine).

    target "cpu": uint8 activations, int8 weights (the fast U8S8 kernels of x86 CPUs).
    target "tensorrt": symmetric int8 activations and weights (zero point 0, as TensorRT requires;
    the post-SiLU activations then use half the grid: measure with `pel evaluate --int8-calibration`).
    op_types: the ops whose inputs get Q/DQ (None: every op ORT can quantise). Convolutions and
    the final Gemm carry nearly all FLOPs; quantising SiLU, the median filter and the attention
    gates too costs accuracy (measured on a weak test model: decision agreement 84% all ops +
    min/max, 87% Conv/Gemm + min/max, 92% Conv/Gemm + percentile).
    keep_float: weight-name prefixes (e.g. "rgb.blocks.5", "rgb.") of layers left in float, a
    mixed-precision fallback for layers with outlier channels (see docs/benchmarks.md).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if target not in ("cpu", "tensorrt"):
        raise ValueError(f"target must be 'cpu' or 'tensorrt', got {target!r}")
    src, out_path = Path(onnx_fp32_path), Path(out_path)
    if not src.is_file():
        raise FileNotFoundError(f"ONNX model {src} does not exist")
    _check_calibration(calibration_crops, _input_size(onnx.load(str(src), load_external_data=False)))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pel-quant-") as tmp:
        model_in = src
        if preprocess:  # shape inference + graph optimisation: cleaner Q/DQ placement
            model_in = Path(tmp) / "pre.onnx"
            quant_pre_process(str(src), str(model_in), skip_symbolic_shape=True)
        model = onnx.load(str(model_in))
        exclude = frontend_nodes(model) if keep_frontend_float else []
        exclude += float_layers(model, keep_float)
        symmetric = target == "tensorrt"
        # Written beside the target, then renamed: concurrent replicas never read half a graph.
        partial = out_path.with_name(f".{out_path.name}.{os.getpid()}.partial")
        try:
            quantize_static(
                str(model_in), str(partial), _CropReader(calibration_crops, batch_size),
                quant_format=QuantFormat.QDQ, per_channel=per_channel,
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                op_types_to_quantize=list(op_types) if op_types is not None else None,
                calibrate_method=getattr(CalibrationMethod, calibrate_method),
                extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
            onnx.checker.check_model(str(partial))
            os.replace(partial, out_path)
        finally:
            partial.unlink(missing_ok=True)
    log.info("INT8 (QDQ, %s) graph written to %s; %d front-end nodes kept in float",
             target, out_path, len(exclude))
    return out_path


def float_layers(model: onnx.ModelProto, prefixes: Sequence[str]) -> list[str]:
    """Names of the Conv/Gemm nodes whose weight name starts with one of `prefixes`."""
    names, unused = [], set(prefixes)
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 1:
            hits = {p for p in prefixes if node.input[1].startswith(p)}
            if hits:
                names.append(node.name)
                unused -= hits
    if unused:
        raise ValueError(f"keep_float prefixes {sorted(unused)} match no Conv/Gemm weight "
                         "(names look like 'rgb.blocks.5', 'freq.conv_head', 'mutual.3', 'fc')")
    return names


def cast_input_first(src: str | Path, dst: str | Path) -> Path:
    """Rewrite `crops -> Transpose -> Cast` as `crops -> Cast -> Transpose` (same values).

    TensorRT accepts uint8 network inputs only when a Cast reads them directly.
    """
    model = onnx.load(str(src))
    nodes = list(model.graph.node)
    readers = [n for n in nodes if INPUT_NAME in n.input]
    if len(readers) == 1 and readers[0].op_type == "Transpose":
        transpose = readers[0]
        casts = [n for n in nodes if transpose.output[0] in n.input]
        if len(casts) == 1 and casts[0].op_type == "Cast":
            cast = casts[0]
            mid, final = f"{INPUT_NAME}_cast", cast.output[0]
            cast.input[0], cast.output[0] = INPUT_NAME, mid
            transpose.input[0], transpose.output[0] = mid, final
            # Keep the graph topologically sorted: the Cast now runs first.
            nodes.remove(cast)
            nodes.insert(nodes.index(transpose), cast)
            del model.graph.node[:]
            model.graph.node.extend(nodes)
            del model.graph.value_info[:]  # stale types of the moved tensors; re-inferred below
            model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def load_calibration_crops(folder: str | Path, input_size: int, limit: int = 256,
                           seed: int = 0, split: str = "val") -> np.ndarray:
    """Up to `limit` face crops, resized to uint8 (N, S, S, 3), drawn at random (seeded).

    `folder` is either a `pel prepare` output (crops of `split`, half real and half fake; see
    `training.data.calibration_crops`) or any folder of jpg/png face crop images (searched
    recursively), which should hold fakes as well as real faces: ranges calibrated on real
    faces only can clip the activations that flag a fake (docs/benchmarks.md).
    """
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"calibration folder {folder} does not exist")
    if (folder / "index.jsonl").is_file():
        from training.data import calibration_crops  # the training package reads prepared folders

        crops = calibration_crops(folder, split, limit, seed)
    else:
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if len(files) < 8:
            raise ValueError(f"{folder} holds {len(files)} face images: calibration needs at least 8")
        pick = sorted(np.random.default_rng(seed).choice(len(files), min(limit, len(files)), replace=False))
        crops = [np.asarray(Image.open(files[i]).convert("RGB")) for i in pick]
    return np.stack([c if c.shape[:2] == (input_size, input_size) else
                     np.asarray(Image.fromarray(c).resize((input_size, input_size), Image.BILINEAR))
                     for c in crops]).astype(np.uint8)

