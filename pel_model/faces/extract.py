"""The one preprocessing path: frame -> detected faces -> square crops (training and serving)."""
from __future__ import annotations

import numpy as np

from pel_model.config import FaceConfig

from .crop import crop_face
from .types import Face, FaceDetector, check_frame


def make_detector(cfg: FaceConfig) -> FaceDetector:
    """Build the detector named by `cfg.detector`."""
    if cfg.detector == "centerface":
        from .centerface import CenterFace

        return CenterFace(cfg)
    raise ValueError(f"unknown face detector {cfg.detector!r}")


def extract_faces_counted(
    frame: np.ndarray, detector: FaceDetector, cfg: FaceConfig, size: int
) -> tuple[list[tuple[Face, np.ndarray]], int]:
    """(faces with their `size x size` crops, how many more faces were found but not kept).

    Faces come best score first, at most `cfg.max_faces_per_frame` of them; the rest are
    counted, so a verdict can say that a crowded frame was not scored in full.
    """
    check_frame(frame)
    found = detector.detect(frame)
    kept = found[: cfg.max_faces_per_frame]
    return [(face, crop_face(frame, face, size, cfg.margin)) for face in kept], len(found) - len(kept)


def extract_faces(
    frame: np.ndarray, detector: FaceDetector, cfg: FaceConfig, size: int
) -> list[tuple[Face, np.ndarray]]:
    """Detect faces in an HxWx3 uint8 RGB frame and crop each to `size x size` with `cfg.margin`
    (best score first, at most `cfg.max_faces_per_frame`)."""
    return extract_faces_counted(frame, detector, cfg, size)[0]
