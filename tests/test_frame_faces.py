"""Faces detected as frames arrive (workers.frame_faces): the same crops as detecting each
decoded frame, requests leave before their clip ends, and clips keep no frame pixels."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pel_model.backends import OnnxRuntimeBackend
from pel_model.config import AppConfig
from pel_model.faces import crop_face, extract_faces, make_detector
from workers.decode import clip_windows, iter_sampled_frames
from workers.frame_faces import FrameFaces, detect_frames
from workers.pipeline import Hooks, ModelInfo, run_job, score_clip
from workers.jobs import parse_job
from workers.sample_media import astronaut, make_face_video
from workers.urls import check_url


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    a = astronaut()
    return make_face_video(tmp_path_factory.mktemp("ff") / "two.mp4",
                           [a, np.ascontiguousarray(a[:, ::-1])], seconds=6)


@pytest.fixture(scope="module")
def cfg(clip_path):
    return AppConfig.model_validate({
        "urls": {"allow_files": True, "file_roots": [str(clip_path.parent)]},
        "stream": {"sample_fps": 2.0, "clip_seconds": 2.0, "crops_per_request": 3}})


class Recorder:
    """Submits to a real ONNX Runtime backend on a thread pool; logs when each request left."""

    def __init__(self, backend, events):
        self.backend, self.events = backend, events
        self.pool = ThreadPoolExecutor(1)

    def __call__(self, crops):
        self.events.append(("request", len(crops)))
        return _Future(self.pool.submit(_probabilities, self.backend, crops))


class _Future:
    def __init__(self, fut):
        self.fut = fut

    def result(self, timeout_s=None):
        return self.fut.result(timeout=timeout_s)


def _probabilities(backend, crops):
    return 1 / (1 + np.exp(-backend.logits(crops)))


def _frames(path, cfg, events=None):
    src = check_url(f"file://{path}", cfg.urls)
    for f in iter_sampled_frames(src, cfg.stream, 2.0, False):
        if events is not None:
            events.append(("frame", f.pts_s))
        yield f


def test_same_crops_as_detecting_each_decoded_frame(clip_path, cfg, onnx_path):
    detector = make_detector(cfg.faces)
    expected = [crop for f in _frames(clip_path, cfg)
                for _, crop in extract_faces(f.rgb, detector, cfg.faces, 224)]
    backend = OnnxRuntimeBackend(onnx_path, 224)
    events: list = []
    submit = Recorder(backend, events)
    clips = list(clip_windows(detect_frames(_frames(clip_path, cfg, events), detector, cfg, 224,
                                            2.0, submit), 2.0, 2.0))
    assert [c.index for c in clips] == [0, 1, 2]
    got = [crop for c in clips for crop in c.frames[0].requests.crops]
    assert len(got) == len(expected) >= 20  # two faces in each of 12 frames
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    for c in clips:  # a clip holds crops and times, no frame pixels
        assert all(isinstance(f, FrameFaces) and not hasattr(f, "rgb") for f in c.frames)
        assert len({id(f.requests) for f in c.frames}) == 1
        scored, skipped = score_clip(c, cfg, submit)
        assert skipped == 0 and len(scored) == len(c.frames[0].requests.crops)
        want = _probabilities(backend, np.stack(c.frames[0].requests.crops))
        np.testing.assert_allclose([s.score for s in scored], want, rtol=1e-4, atol=1e-6)
    # Requests of 3 crops leave while the clip's later frames are still being decoded.
    first_request = events.index(("request", 3))
    later = [t for kind, t in events[first_request:] if kind == "frame"]
    assert later and min(later) < 2.0, "the first clip's first request waited for the clip to end"
    sizes = [n for kind, n in events if kind == "request"]
    assert sum(sizes) == len(got) and max(sizes) == 3


def test_run_job_scores_every_clip_through_detect_frames(clip_path, cfg, onnx_path):
    detector = make_detector(cfg.faces)
    submit = Recorder(OnnxRuntimeBackend(onnx_path, 224), [])
    verdicts = []
    job = parse_job(f'{{"id": "ff1", "url": "file://{clip_path}"}}'.encode())
    info = ModelInfo(input_size=224, threshold=0.5, model_id="small")
    totals = run_job(job, cfg, detector, info, submit,
                     hooks=Hooks(on_verdict=lambda v, t: verdicts.append(v)))
    assert totals.clips_done == 3 and totals.clips_failed == 0
    assert [v["faces_scored"] for v in verdicts] == [8, 8, 8]
    assert all(v["label"] not in ("error", "no_face") for v in verdicts)


def test_a_request_that_cannot_be_sent_fails_its_clip_only(clip_path, cfg, onnx_path):
    """submit() raising (no replica yet) surfaces when the clip collects, after its retries."""
    detector = make_detector(cfg.faces)
    calls = {"n": 0}
    backend = OnnxRuntimeBackend(onnx_path, 224)
    pool = ThreadPoolExecutor(1)

    def flaky(crops):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise RuntimeError("no replica")
        return _Future(pool.submit(_probabilities, backend, crops))

    quick = cfg.model_copy(update={"stream": cfg.stream.model_copy(update={"scoring_retry_s": 5.0})})
    clips = list(clip_windows(detect_frames(_frames(clip_path, quick), detector, quick, 224, 2.0,
                                            flaky), 2.0, 2.0))
    scored, _ = score_clip(clips[0], quick, flaky)  # retried: resent and scored
    assert len(scored) == 8


def test_a_stream_that_breaks_off_still_scores_its_last_clip(clip_path, cfg, onnx_path, tmp_path):
    """A real TS over HTTP that stalls after ~3 s: the half-decoded clip gets a verdict saying
    so (its crops were sent and scored) before the error reaches the worker."""
    from media import make_ts, stalling_http_server

    from workers.decode import StreamError

    ts = make_ts(clip_path, tmp_path / "two.ts").read_bytes()
    quick = AppConfig.model_validate({
        "urls": {"allow_private_addresses": True},
        "stream": {"sample_fps": 2.0, "clip_seconds": 2.0, "crops_per_request": 3,
                   "stall_timeout_s": 1.0, "read_timeout_s": 30.0}})
    detector = make_detector(quick.faces)
    submit = Recorder(OnnxRuntimeBackend(onnx_path, 224), [])
    verdicts = []
    with stalling_http_server(ts[: len(ts) // 2]) as url:
        job = parse_job(f'{{"id": "cut1", "url": "{url}", "options": {{"live": false}}}}'.encode())
        with pytest.raises(StreamError) as info:
            run_job(job, quick, detector, ModelInfo(224, 0.5, "small"), submit,
                    hooks=Hooks(on_verdict=lambda v, t: verdicts.append(v)))
    assert info.value.reason == "stalled"
    assert len(verdicts) >= 1
    last = verdicts[-1]
    assert [v["clip_index"] for v in verdicts] == list(range(len(verdicts)))
    assert any("broke off" in w and "stalled" in w for w in last["warnings"]), last
    assert last["frames_sampled"] >= 1 and last["faces_scored"] == 2 * last["frames_sampled"]
    assert last["label"] not in ("error", "no_face", "gap")
    assert not any("broke off" in w for v in verdicts[:-1] for w in v["warnings"])


class CountingDetector:
    """The real CenterFace, counting how often it runs."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def detect(self, frame):
        self.calls += 1
        return self.inner.detect(frame)


def test_detect_every_second_frame_follows_tracks_with_the_same_crops(tmp_path):
    """tracks.detect_every = 2 on a face moving smoothly: CenterFace runs on half the sampled
    frames; the frames in between get the followed face, cropped about where detection would
    have cropped it (no further off than two detected frames 0.5 s apart are)."""
    from media import make_moving_face_video
    from workers.face_tracks import iou

    path = make_moving_face_video(tmp_path / "moving.mp4", seconds=6.0)
    cfg = AppConfig.model_validate({
        "urls": {"allow_files": True, "file_roots": [str(tmp_path)]},
        "stream": {"sample_fps": 2.0, "clip_seconds": 2.0}, "tracks": {"detect_every": 2}})
    detector = make_detector(cfg.faces)
    frames = list(_frames(path, cfg))
    expected = {f.pts_s: extract_faces(f.rgb, detector, cfg.faces, 224) for f in frames}
    assert all(len(v) == 1 for v in expected.values())
    counting = CountingDetector(detector)
    clips = list(clip_windows(detect_frames(iter(frames), counting, cfg, 224, 2.0), 2.0, 2.0))
    assert counting.calls == len(frames) // 2 == 6
    got = {t: (face, track, crop) for c in clips
           for (t, face, track), crop in zip(c.frames[0].requests.meta, c.frames[0].requests.crops)}
    assert sorted(got) == sorted(expected)
    assert len({track for _, track, _ in got.values()}) == 1  # one person, one track
    times = sorted(got)
    for i, t in enumerate(times):
        face, _, crop = got[t]
        ref_face, ref_crop = expected[t][0]
        diff = np.abs(crop.astype(np.int16) - ref_crop).mean()
        if i % 2 == 0:  # a detected frame: exactly the detection's crop
            np.testing.assert_array_equal(crop, ref_crop)
            continue
        prev_face, prev_crop = expected[times[i - 1]][0]  # the detector's own frame-to-frame change
        if i == 1:  # one detection so far, no velocity yet: the face stays where it was seen
            assert face.as_list()[:4] == prev_face.as_list()[:4]
            continue
        assert iou(face, ref_face) > max(0.85, iou(prev_face, ref_face)), t
        frame = next(f for f in frames if f.pts_s == t)  # the crop is serving's crop of that box
        np.testing.assert_array_equal(crop, crop_face(frame.rgb, face, 224, cfg.faces.margin))
        assert diff < 1.5 * np.abs(prev_crop.astype(np.int16) - ref_crop).mean(), t
