"""Face detection and cropping on real images (skimage's astronaut photo, the shared face photos)."""
from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from skimage import data

from pel_model.config import FaceConfig
from pel_model.faces import extract_faces_counted, CenterFace, Face, FaceDetector, crop_face, extract_faces, make_detector, square_box

# Where the astronaut's face is in skimage.data.astronaut() (512x512), checked by eye on the
# drawn box in /tmp/faces_check.png: forehead/hairline to chin, ear to ear.
ASTRONAUT_FACE = (180.0, 58.0, 271.0, 176.0)
# A 260x250 patch of the photo around the face (hair, face, collar) used to build test frames.
PATCH_Y, PATCH_X = slice(0, 260), slice(100, 350)


def _shared_data() -> Path:
    env = os.environ.get("PEL_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def _iou(a: Face, b: tuple[float, float, float, float]) -> float:
    ix = max(0.0, min(a.x1, b[2]) - max(a.x0, b[0]))
    iy = max(0.0, min(a.y1, b[3]) - max(a.y0, b[1]))
    inter = ix * iy
    return inter / (a.width * a.height + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _place(image: np.ndarray, height: int, width: int, ox: int, oy: int) -> np.ndarray:
    canvas = np.zeros((height, width, 3), np.uint8)
    canvas[oy : oy + image.shape[0], ox : ox + image.shape[1]] = image
    return canvas


@pytest.fixture(scope="module")
def detector() -> CenterFace:
    return CenterFace(FaceConfig())


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()


@pytest.fixture(scope="module")
def patch(astronaut) -> np.ndarray:
    return np.ascontiguousarray(astronaut[PATCH_Y, PATCH_X])


def test_astronaut_has_exactly_one_face(detector, astronaut):
    faces = detector.detect(astronaut)
    assert len(faces) == 1
    face = faces[0]
    assert face.score > FaceConfig().score_threshold
    assert _iou(face, ASTRONAUT_FACE) > 0.85, face
    assert face.landmarks is not None and len(face.landmarks) == 5
    for x, y in face.landmarks:
        assert face.x0 <= x <= face.x1 and face.y0 <= y <= face.y1
    (lex, ley), (rex, rey), (nx, ny), (lmx, lmy), (rmx, rmy) = face.landmarks
    assert lex < nx < rex and lmx < rmx  # left-to-right order in the image
    assert max(ley, rey) < ny < min(lmy, rmy)  # eyes above nose above mouth
    assert face.as_list() == [face.x0, face.y0, face.x1, face.y1, face.score]
    assert face.as_dict()["landmarks"][2] == [nx, ny]

    image = Image.fromarray(astronaut)
    draw = ImageDraw.Draw(image)
    draw.rectangle(face.as_list()[:4], outline=(255, 0, 0), width=2)
    for x, y in face.landmarks:
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(0, 255, 0))
    image.save("/tmp/faces_check.png")


def test_no_faces_in_blank_or_noise(detector):
    assert detector.detect(np.zeros((480, 640, 3), np.uint8)) == []
    assert detector.detect(np.full((480, 640, 3), 255, np.uint8)) == []
    noise = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    assert detector.detect(noise) == []


def test_box_follows_the_face_when_shifted(detector, patch):
    ref = detector.detect(_place(patch, 480, 640, 0, 0))
    assert len(ref) == 1
    for ox, oy in [(20, 30), (350, 190), (17, 5)]:
        faces = detector.detect(_place(patch, 480, 640, ox, oy))
        assert len(faces) == 1
        got, want = faces[0], ref[0]
        for g, w in zip(got.as_list()[:4], [want.x0 + ox, want.y0 + oy, want.x1 + ox, want.y1 + oy]):
            assert abs(g - w) <= 6.0, (ox, oy, got, want)
        assert abs(got.center[0] - want.center[0] - ox) <= 3.0
        assert abs(got.center[1] - want.center[1] - oy) <= 3.0


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_scaled_face_in_larger_canvas(detector, patch, scale):
    ref = detector.detect(_place(patch, 480, 640, 0, 0))[0]
    h, w = patch.shape[:2]
    resized = np.asarray(Image.fromarray(patch).resize((round(w * scale), round(h * scale)), Image.BILINEAR))
    ox, oy = 301, 157
    faces = detector.detect(_place(resized, 960, 1280, ox, oy))  # detector sees it at half size
    assert len(faces) == 1
    want = (ref.x0 * scale + ox, ref.y0 * scale + oy, ref.x1 * scale + ox, ref.y1 * scale + oy)
    assert _iou(faces[0], want) > 0.8, (faces[0], want)
    side = max(ref.width, ref.height) * scale
    assert abs(faces[0].center[0] - (want[0] + want[2]) / 2) <= 0.06 * side
    assert abs(faces[0].center[1] - (want[1] + want[3]) / 2) <= 0.06 * side


def test_max_faces_per_frame_and_order(patch):
    tiled = np.concatenate([np.concatenate([patch] * 3, axis=1)] * 2, axis=0)  # 2x3 = 6 faces
    all_faces = CenterFace(FaceConfig(max_faces_per_frame=10)).detect(tiled)
    assert len(all_faces) == 6
    centres = sorted((round(f.center[1] // 260), round(f.center[0] // 250)) for f in all_faces)
    assert centres == [(r, c) for r in range(2) for c in range(3)]  # one face per tile
    scores = [f.score for f in all_faces]
    assert scores == sorted(scores, reverse=True)
    cfg = FaceConfig(max_faces_per_frame=4)
    kept, skipped = extract_faces_counted(tiled, CenterFace(cfg), cfg, 32)
    assert [f.as_list() for f, _ in kept] == [f.as_list() for f in all_faces[:4]]
    assert skipped == 2  # counted, so the verdict can say the frame was not scored in full


def test_min_face_px_drops_small_faces(astronaut):
    assert len(CenterFace(FaceConfig(min_face_px=80)).detect(astronaut)) == 1
    assert CenterFace(FaceConfig(min_face_px=130)).detect(astronaut) == []


def test_detector_protocol_and_factory(detector):
    assert isinstance(detector, FaceDetector)
    made = make_detector(FaceConfig())
    assert isinstance(made, CenterFace) and made.providers == ["CPUExecutionProvider"]
    assert detector.weights_path.name == "centerface.onnx"
    scale, new_h, new_w, pad_h, pad_w = detector.input_shape((1080, 1920, 3))
    assert (new_w, new_h, pad_w, pad_h) == (640, 360, 640, 384)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        CenterFace(FaceConfig(detector_weights=tmp_path / "nope.onnx"))


@pytest.mark.parametrize(
    "frame, reason",
    [
        (np.zeros((64, 64, 3), np.float32), "uint8"),
        (np.zeros((64, 64), np.uint8), "HxWx3"),
        (np.zeros((64, 64, 4), np.uint8), "HxWx3"),
        (np.zeros((64, 64, 1), np.uint8), "HxWx3"),
        (np.zeros((0, 64, 3), np.uint8), "empty"),
        ([[0, 0, 0]], "numpy array"),
    ],
)
def test_bad_frames_raise(detector, frame, reason):
    face = Face(1, 1, 10, 10, 0.9)
    with pytest.raises(ValueError, match=reason):
        detector.detect(frame)
    with pytest.raises(ValueError, match=reason):
        crop_face(frame, face, 32, 0.3)
    with pytest.raises(ValueError, match=reason):
        extract_faces(frame, detector, FaceConfig(), 32)


def _ramp(h: int = 100, w: int = 120) -> np.ndarray:
    """Frame whose pixels encode their own position: R = x, G = y, B = 7."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx, yy, np.full_like(xx, 7)], axis=2).astype(np.uint8)


def test_crop_geometry_inside_frame():
    frame = _ramp()
    face = Face(40, 30, 60, 50, 0.9)
    assert square_box(face, 0.5, frame.shape) == (35, 25, 65, 55)
    crop = crop_face(frame, face, 30, 0.5)
    assert crop.shape == (30, 30, 3) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop, frame[25:55, 35:65])
    tall = Face(40, 20, 60, 60, 0.9)  # 20x40 box -> 40x40 square centred on (50, 40)
    assert square_box(tall, 0.0, frame.shape) == (30, 20, 70, 60)


def test_crop_mirrors_the_frame_outside_its_edges():
    frame = _ramp()
    top_left = crop_face(frame, Face(0, 0, 20, 20, 0.9), 40, 1.0)  # box (-10, -10, 30, 30)
    np.testing.assert_array_equal(top_left[10:, 10:], frame[0:30, 0:30])
    # row -k is row k, column -k is column k (reflection about the edge pixel)
    np.testing.assert_array_equal(top_left[:10, 10:], frame[10:0:-1, 0:30])
    np.testing.assert_array_equal(top_left[10:, :10], frame[0:30, 10:0:-1])
    bottom_right = crop_face(frame, Face(100, 80, 120, 100, 0.9), 40, 1.0)  # box (90, 70, 130, 110)
    np.testing.assert_array_equal(bottom_right[:30, :30], frame[70:100, 90:120])
    np.testing.assert_array_equal(bottom_right[30:, :30], frame[98:88:-1, 90:120])
    assert bottom_right.min() > 0  # no black bars: the ramp's B channel is 7 everywhere
    # a square much larger than the frame still fills without zeros
    huge = crop_face(frame[:5, :5], Face(0, 0, 5, 5, 0.9), 64, 2.0)
    assert huge.shape == (64, 64, 3) and (huge[..., 2] == 7).all()


def test_crop_resize_is_exact_size_and_deterministic():
    frame = np.full((100, 120, 3), 200, np.uint8)
    face = Face(0, 0, 20, 20, 0.9)  # 40 px square, a quarter of it outside the frame
    crop = crop_face(frame, face, 64, 1.0)
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop, crop_face(frame, face, 64, 1.0))
    assert (crop == 200).all()  # the mirrored border keeps the frame's values
    small = crop_face(frame, Face(30, 30, 90, 90, 0.9), 16, 0.2)
    assert small.shape == (16, 16, 3) and (small == 200).all()


def test_crop_rejects_bad_arguments():
    frame = _ramp()
    with pytest.raises(ValueError, match="size"):
        crop_face(frame, Face(40, 30, 60, 50, 0.9), 0, 0.3)
    with pytest.raises(ValueError, match="margin"):
        crop_face(frame, Face(40, 30, 60, 50, 0.9), 32, -0.1)
    with pytest.raises(ValueError, match="outside"):
        crop_face(frame, Face(130, 30, 150, 50, 0.9), 32, 0.3)
    with pytest.raises(ValueError, match="empty face box"):
        Face(10, 10, 5, 20, 0.9)


def test_extract_faces_is_detect_then_crop(detector, astronaut):
    cfg = FaceConfig()
    results = extract_faces(astronaut, detector, cfg, 320)
    assert len(results) == 1
    face, crop = results[0]
    assert crop.shape == (320, 320, 3) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop, crop_face(astronaut, face, 320, cfg.margin))


class AnnotatedFaces:
    """A detector reading boxes from annotations, e.g. for a data set that ships face boxes."""

    def __init__(self, boxes: list[tuple[float, float, float, float]]):
        self.boxes = boxes

    def detect(self, frame: np.ndarray) -> list[Face]:
        return [Face(*box, score=1.0, landmarks=None) for box in self.boxes]


def test_any_detector_plugs_into_extract_faces():
    frame = _ramp()
    plugged = AnnotatedFaces([(40, 30, 60, 50), (0, 0, 20, 20)])
    assert isinstance(plugged, FaceDetector)
    results = extract_faces(frame, plugged, FaceConfig(margin=0.5, max_faces_per_frame=1), 30)
    assert len(results) == 1
    np.testing.assert_array_equal(results[0][1], frame[25:55, 35:65])


@pytest.mark.shared_data
def test_real_face_photos_are_detected(detector):
    """The shared photos are tight 200x200 face crops. A stream frame shows a face with its
    surroundings, so each photo is pasted at the centre of a 640x480 mid-grey frame (no scaling,
    default thresholds) and the best face must cover the frame centre."""
    folder = _shared_data() / "faces-real" / "images"
    paths = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    if not paths:
        pytest.skip(f"shared face photos not found under {folder}")
    sample = random.Random(1234).sample(paths, 40)
    found = 0
    for path in sample:
        photo = np.asarray(Image.open(path).convert("RGB"))
        frame = np.full((480, 640, 3), 128, np.uint8)
        top, left = (480 - photo.shape[0]) // 2, (640 - photo.shape[1]) // 2
        frame[top : top + photo.shape[0], left : left + photo.shape[1]] = photo
        faces = detector.detect(frame)
        found += bool(faces) and faces[0].x0 < 320 < faces[0].x1 and faces[0].y0 < 240 < faces[0].y1
    assert found >= 38, f"face found in only {found}/40 photos"


def test_cuda_request_uses_cuda_only_when_available(astronaut):
    import onnxruntime as ort

    cuda = CenterFace(FaceConfig(detector_device="cuda"))
    expected = "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() else "CPUExecutionProvider"
    assert cuda.providers[0] == expected
    assert len(cuda.detect(astronaut)) == 1


def test_detector_survives_pickling(detector, astronaut):
    import pickle

    clone = pickle.loads(pickle.dumps(detector))
    assert clone.cfg == detector.cfg
    assert [f.as_list() for f in clone.detect(astronaut)] == [f.as_list() for f in detector.detect(astronaut)]


@pytest.mark.parametrize("bound", [1, 2, None])
def test_detector_concurrency_bounds_runs_at_once(astronaut, bound):
    """Streams sharing a detector run CenterFace at most `detector_concurrency` at a time (each
    run holds its own activations), with the same faces as one at a time; null: no bound."""
    det = CenterFace(FaceConfig(detector_concurrency=bound))
    session, lock = det._session, threading.Lock()
    running, most = [0], [0]

    class Counting:  # the real session, counting the runs inside it
        def __getattr__(self, name):
            return getattr(session, name)

        def run(self, *args, **kw):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            try:
                time.sleep(0.05)  # hold the turn long enough for the others to arrive
                return session.run(*args, **kw)
            finally:
                with lock:
                    running[0] -= 1

    def boxes(_=None):
        return [(f.x0, f.y0, f.x1, f.y1, f.score) for f in det.detect(astronaut)]

    det._session = Counting()
    want = boxes()
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(boxes, range(12)))
    assert all(np.allclose(g, want) for g in got)
    assert most[0] == (bound or 6)
