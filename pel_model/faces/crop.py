"""Square face crops, identical for training and serving.

Geometry: a square centred on the face box with side `max(w, h) * (1 + margin)`, snapped to whole
pixels (`square_box`). Parts of the square outside the frame are filled by mirroring the frame
at its edge (`numpy.pad(mode="reflect")`): never black bars, which a detector could learn as a
cue of tight source crops, and the same in training and serving. The square is then
resized to `size x size` with PIL's bilinear filter (`Image.Resampling.BILINEAR`, which widens its
support when shrinking, i.e. antialiased); when the square already is `size` pixels no resampling
happens. The result depends only on the inputs (deterministic).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from .types import Face, check_frame

RESAMPLE = Image.Resampling.BILINEAR


def square_box(face: Face, margin: float, frame_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """Integer (x0, y0, x1, y1) of the square crop; it may extend past the frame's edges.

    Raises ValueError for a negative margin or a face that does not overlap the frame.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    h, w = frame_shape[:2]
    if face.x1 <= 0 or face.y1 <= 0 or face.x0 >= w or face.y0 >= h:
        raise ValueError(f"face {face.as_list()[:4]} lies outside the {w}x{h} frame")
    side = max(1, int(round(max(face.width, face.height) * (1.0 + margin))))
    cx, cy = face.center
    x0 = int(np.floor(cx - side / 2.0 + 0.5))
    y0 = int(np.floor(cy - side / 2.0 + 0.5))
    return x0, y0, x0 + side, y0 + side


def crop_face(frame: np.ndarray, face: Face, size: int, margin: float) -> np.ndarray:
    """`size x size x 3` uint8 crop of `face` from an HxWx3 uint8 RGB frame (see module doc)."""
    check_frame(frame)
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"crop size must be a positive integer, got {size!r}")
    x0, y0, x1, y1 = square_box(face, margin, frame.shape)
    h, w = frame.shape[:2]
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    square = frame[sy0:sy1, sx0:sx1]
    pad = ((sy0 - y0, y1 - sy1), (sx0 - x0, x1 - sx1), (0, 0))
    if any(p for axis in pad for p in axis):
        square = np.pad(square, pad, mode="reflect" if min(square.shape[:2]) > 1 else "edge")
    if square.shape[0] == size:
        return square
    return np.asarray(Image.fromarray(square).resize((int(size), int(size)), RESAMPLE))
