"""Images that already are face crops (DFDC / FF++ / Celeb-DF crop dumps, WildDeepfake frames).

CenterFace finds no face in about a quarter of such images (the face fills the frame), and the
serving crop (face box plus `margin`) reaches past their edges. So the image is first placed on a
grey canvas with `PAD` of its size on every side, the face is detected there (at most
`DETECT_WIDTH` px wide: the face then spans ~100-200 px, CenterFace's comfortable range), and
when nothing is found the whole image is taken as the face box. The crop itself is serving's
`crop_face` on the original image (same margin, same resize; the part past the edges mirrored),
so a face has the same scale and framing in training as in a stream.
"""
from __future__ import annotations

import numpy as np

from pel_model.config import FaceConfig

from .crop import crop_face
from .types import Face, FaceDetector, check_frame

PAD = 0.5  # canvas border, as a fraction of the image's longer side
DETECT_WIDTH = 320
GREY = 127


def detector_config(cfg: FaceConfig) -> FaceConfig:
    """The face config used to detect on padded face-crop canvases."""
    return cfg.model_copy(update={"detector_input_width": min(cfg.detector_input_width, DETECT_WIDTH)})


def locate_face(image: np.ndarray, detector: FaceDetector) -> tuple[Face, bool]:
    """(face box in image pixels, fell_back): the largest detected face whose centre lies inside
    the image, or the whole image when there is none."""
    check_frame(image)
    h, w = image.shape[:2]
    p = int(round(PAD * max(h, w)))
    canvas = np.full((h + 2 * p, w + 2 * p, 3), GREY, np.uint8)
    canvas[p:p + h, p:p + w] = image
    inside = []
    for f in detector.detect(canvas):
        face = Face(f.x0 - p, f.y0 - p, f.x1 - p, f.y1 - p, f.score,
                    None if f.landmarks is None else tuple((x - p, y - p) for x, y in f.landmarks))
        cx, cy = face.center
        if 0 <= cx < w and 0 <= cy < h:
            inside.append(face)
    if inside:
        return max(inside, key=lambda f: (f.width * f.height, f.score)), False
    return Face(0.0, 0.0, float(w), float(h), 0.0), True


def crop_face_input(image: np.ndarray, detector: FaceDetector, cfg: FaceConfig, size: int
                    ) -> tuple[Face, np.ndarray, bool]:
    """(face, crop, fell_back) for an image that is a face crop; never drops the image."""
    face, fell_back = locate_face(image, detector)
    return face, crop_face(image, face, size, cfg.margin), fell_back
