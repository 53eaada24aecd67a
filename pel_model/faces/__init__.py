"""Face detection and cropping shared by training data preparation and the stream workers."""
from .centerface import CenterFace, default_weights_path
from .crop import crop_face, square_box
from .extract import extract_faces, make_detector
from .types import Face, FaceDetector, check_frame

__all__ = [
    "CenterFace",
    "Face",
    "FaceDetector",
    "check_frame",
    "crop_face",
    "default_weights_path",
    "extract_faces",
    "make_detector",
    "square_box",
]
