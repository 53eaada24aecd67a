"""Face tracks (workers/face_tracks.py): people crossing, leaving and coming back, fast moves;
on a real encoded two-person video through `detect_frames` (PyAV + CenterFace), tracks carry
across clip windows; and the clip rule they feed (workers/verdict.py)."""
from __future__ import annotations

import numpy as np
import pytest

from pel_model.config import AppConfig, TrackConfig
from pel_model.faces import Face, make_detector
from workers.decode import clip_windows, iter_sampled_frames
from workers.face_tracks import FaceTracker, center_shift, iou
from workers.frame_faces import detect_frames
from workers.sample_media import astronaut, make_face_video
from workers.urls import check_url
from workers.verdict import ScoredFace, make_verdict
from workers.verdicts import InvalidVerdict, validate_verdict


def box(cx: float, cy: float, w: float = 60.0) -> Face:
    return Face(cx - w / 2, cy - w / 2, cx + w / 2, cy + w / 2, 0.9)


def test_iou_and_centre_shift_against_hand_computed_values():
    a, b = Face(0, 0, 10, 10, 1), Face(5, 0, 15, 10, 1)
    assert iou(a, b) == pytest.approx(50 / 150)
    assert iou(a, Face(20, 20, 30, 30, 1)) == 0.0
    assert center_shift(a, b) == pytest.approx(0.5)


def test_two_people_crossing_keep_their_tracks():
    tracker = FaceTracker(TrackConfig())
    seen = []
    for i in range(13):  # A goes right, B goes left; they overlap fully at i = 6
        t = i * 0.5
        a_box, b_box = box(100 + 25 * i, 200), box(400 - 25 * i, 200)
        ids = tracker.assign(t, [b_box, a_box] if i % 2 else [a_box, b_box])  # any order
        seen.append(dict(zip("BA" if i % 2 else "AB", ids)))
    a, b = seen[0]["A"], seen[0]["B"]
    assert a != b
    # before and after the crossing (A now on the right), each keeps its own track
    assert all(s["A"] == a and s["B"] == b for s in seen[:6] + seen[7:])


def test_one_leaving_ends_its_track_and_a_late_return_is_new():
    tracker = FaceTracker(TrackConfig(max_gap_s=1.0))
    first = tracker.assign(0.0, [box(100, 100), box(400, 100)])
    assert tracker.assign(0.5, [box(102, 100), box(400, 101)]) == first
    # B leaves for a frame: A goes on alone
    assert tracker.assign(1.0, [box(104, 100)]) == first[:1]
    # B back within max_gap_s (1.0 s after it was last seen) continues its track...
    assert tracker.assign(1.5, [box(106, 100), box(400, 100)]) == first
    # ...but after a longer absence it is somebody new
    assert tracker.assign(2.0, [box(108, 100)]) == first[:1]
    assert tracker.assign(2.5, [box(110, 100)]) == first[:1]
    late = tracker.assign(3.0, [box(112, 100), box(400, 100)])
    assert late[0] == first[0] and late[1] not in first


def test_fast_move_within_centre_shift_and_one_face_per_track():
    tracker = FaceTracker(TrackConfig(min_iou=0.3, max_center_shift=1.0))
    [a] = tracker.assign(0.0, [box(100, 100)])
    assert tracker.assign(0.5, [box(145, 100)]) == [a]  # IoU 0.14, centre 0.75 widths away
    # two faces both near A's prediction: the closer one continues A, the other is new
    ids = tracker.assign(1.0, [box(230, 100), box(192, 100)])
    assert ids[1] == a and ids[0] != a


@pytest.fixture(scope="module")
def two_people(tmp_path_factory):
    a = astronaut()
    return make_face_video(tmp_path_factory.mktemp("tracks") / "two.mp4",
                           [a, np.ascontiguousarray(a[:, ::-1])], seconds=6)


def test_tracks_of_a_real_video_carry_across_clip_windows(two_people):
    cfg = AppConfig.model_validate({
        "urls": {"allow_files": True, "file_roots": [str(two_people.parent)]},
        "stream": {"sample_fps": 2.0, "clip_seconds": 2.0}})
    src = check_url(f"file://{two_people}", cfg.urls)
    frames = detect_frames(iter_sampled_frames(src, cfg.stream, 2.0, False),
                           make_detector(cfg.faces), cfg, 224, 2.0)
    clips = list(clip_windows(frames, 2.0, 2.0))
    assert len(clips) == 3
    by_side: dict[str, set[int]] = {"left": set(), "right": set()}
    per_clip = []
    for clip in clips:
        meta = clip.frames[0].requests.meta
        per_clip.append({track for _, _, track in meta})
        for _, face, track in meta:
            by_side["left" if face.center[0] < 320 else "right"].add(track)
    assert len(by_side["left"]) == len(by_side["right"]) == 1  # one track per person...
    assert by_side["left"] != by_side["right"]
    assert per_clip == [by_side["left"] | by_side["right"]] * 3  # ...in every window


def _verdict(scored, min_faces=3, threshold=0.5):
    return validate_verdict(make_verdict(
        job_id="j", url="https://example.com/v.mp4", clip_index=0, start_s=0.0, end_s=4.0,
        frames_sampled=8, scored=scored, threshold=threshold, model="m", warnings=[], top_k=2,
        latency_s=0.1, min_track_faces=min_faces))


def test_one_forged_person_among_real_ones_makes_the_clip_fake():
    real, fake = box(100, 100), box(400, 100)
    scored = [ScoredFace(t / 2, real, 0.1, 1) for t in range(8)]
    scored += [ScoredFace(t / 2, fake, 0.8, 2) for t in range(4, 8)]  # enters half way
    v = _verdict(scored)
    assert [(t["track_id"], t["label"], t["faces_scored"]) for t in v["tracks"]] == \
        [(1, "real", 8), (2, "fake", 4)]
    assert v["label"] == "fake" and v["fake_probability"] == pytest.approx(0.8)
    assert v["tracks"][1]["first_s"] == 2.0 and v["tracks"][1]["last_s"] == 3.5
    assert v["tracks"][1]["top_frame"]["box"] == [370.0, 70.0, 430.0, 130.0]


def test_a_single_bad_frame_decides_nothing():
    scored = [ScoredFace(t / 2, box(100, 100), 0.1, 1) for t in range(8)]
    scored.append(ScoredFace(1.0, box(500, 300), 0.99, 2))  # one face, one frame
    v = _verdict(scored)
    assert v["tracks"][1]["label"] == "too_few_faces"
    assert v["label"] == "real" and v["fake_probability"] == pytest.approx(0.1)
    # the frame rule would have counted it: (7 x 0.1 + 0.99) / 8
    untracked = [ScoredFace(s.time_s, s.face, s.score) for s in scored]
    assert _verdict(untracked)["fake_probability"] == pytest.approx((0.7 + 0.99) / 8)
    assert _verdict(untracked)["tracks"] == []


def test_only_short_tracks_fall_back_to_the_frame_rule():
    scored = [ScoredFace(0.0, box(100, 100), 0.9, 1), ScoredFace(0.5, box(300, 100), 0.7, 2)]
    v = _verdict(scored)
    assert {t["label"] for t in v["tracks"]} == {"too_few_faces"}
    assert v["label"] == "fake" and v["fake_probability"] == pytest.approx(0.8)


def test_bad_tracks_are_refused():
    v = _verdict([ScoredFace(0.0, box(100, 100), 0.9, 1)])
    with pytest.raises(InvalidVerdict, match="track label"):
        validate_verdict({**v, "tracks": [{**v["tracks"][0], "label": "maybe"}]})
    with pytest.raises(InvalidVerdict, match="track fake_probability"):
        validate_verdict({**v, "tracks": [{**v["tracks"][0], "fake_probability": 1.5}]})


def test_follow_moves_the_last_detected_faces_at_their_velocity():
    tracker = FaceTracker(TrackConfig())
    assert tracker.follow(0.0) == []
    a, b = tracker.assign(0.0, [box(100, 100), box(300, 100)])
    assert tracker.assign(0.5, [box(110, 104), box(300, 100)]) == [a, b]
    followed = dict(tracker.follow(1.0))
    assert set(followed) == {a, b}
    assert followed[a].center == pytest.approx((120, 108)) and followed[b].center == pytest.approx((300, 100))
    assert tracker.follow(1.0) == tracker.follow(1.0)  # following changes no track
    # B not detected on the next detected frame: only A is followed after it, even though
    # B's track is still alive (within max_gap_s)
    assert tracker.assign(1.5, [box(130, 112)]) == [a]
    assert [tid for tid, _ in tracker.follow(2.0)] == [a]
