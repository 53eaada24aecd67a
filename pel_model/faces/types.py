"""Face boxes and the detector interface shared by training and serving."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

Landmarks = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Face:
    """One detected face, in pixel coordinates of the original frame (x right, y down).

    `landmarks`, when the detector provides them, are (x, y) points: for CenterFace the left eye,
    right eye, nose tip, left and right mouth corners (as seen in the image).
    """

    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    landmarks: Landmarks | None = None

    def __post_init__(self) -> None:
        coords = (self.x0, self.y0, self.x1, self.y1, self.score)
        if not all(np.isfinite(c) for c in coords):
            raise ValueError(f"face box and score must be finite, got {coords}")
        if self.x1 <= self.x0 or self.y1 <= self.y0:
            raise ValueError(f"empty face box ({self.x0}, {self.y0}, {self.x1}, {self.y1})")

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x0 + self.x1) / 2.0, (self.y0 + self.y1) / 2.0)

    def as_list(self) -> list[float]:
        """`[x0, y0, x1, y1, score]` as plain floats (JSON friendly)."""
        return [float(self.x0), float(self.y0), float(self.x1), float(self.y1), float(self.score)]

    def as_dict(self) -> dict:
        """Box, score and landmarks as plain JSON types."""
        lms = None if self.landmarks is None else [[float(x), float(y)] for x, y in self.landmarks]
        return {"box": self.as_list()[:4], "score": float(self.score), "landmarks": lms}


@runtime_checkable
class FaceDetector(Protocol):
    """Anything that finds faces in an HxWx3 uint8 RGB frame, best score first."""

    def detect(self, frame: np.ndarray) -> list[Face]: ...


def check_frame(frame: np.ndarray) -> None:
    """Raise ValueError unless `frame` is a non-empty HxWx3 uint8 (RGB) array."""
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"frame must be a numpy array, got {type(frame).__name__}")
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must be HxWx3 RGB, got shape {frame.shape}")
    if frame.dtype != np.uint8:
        raise ValueError(f"frame must be uint8, got dtype {frame.dtype}")
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError(f"frame is empty: shape {frame.shape}")
