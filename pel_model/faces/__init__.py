"""Face detection and cropping shared by training data preparation and the stream workers."""
from .centerface import CenterFace, default_weights_path
from .crop import crop_face, square_box
from .extract import extract_faces, extract_faces_counted, make_detector
from .face_crop_input import crop_face_input
from .types import Face, FaceDetector, check_frame

__all__ = [
    "CenterFace",
    "Face",
    "FaceDetector",
    "check_frame",
    "crop_face",
    "crop_face_input",
    "default_weights_path",
    "extract_faces",
    "extract_faces_counted",
    "make_detector",
    "square_box",
]
