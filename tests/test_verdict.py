"""Clip verdicts from scored faces (workers/verdict.py) are accepted by the verdict store."""
import pytest

from pel_model.faces import Face
from workers.verdict import ScoredFace, make_verdict
from workers.verdicts import validate_verdict

FACE = Face(10.0, 20.0, 110.0, 140.0, 0.9)


def verdict(scored, error=None, threshold=0.5):
    return make_verdict(job_id="j", url="https://user:pw@example.com/v.mp4?token=abc", clip_index=3,
                        start_s=6.0, end_s=8.0, frames_sampled=4, scored=scored,
                        threshold=threshold, model="pel-test", warnings=["w"], top_k=2,
                        latency_s=0.25, error=error)


def test_clip_score_is_the_mean_of_per_frame_maxima():
    scored = [ScoredFace(6.0, FACE, 0.9), ScoredFace(6.0, FACE, 0.1),  # frame 1: max 0.9
              ScoredFace(6.5, FACE, 0.3), ScoredFace(7.0, FACE, 0.6)]
    v = validate_verdict(verdict(scored))
    assert v["fake_probability"] == pytest.approx((0.9 + 0.3 + 0.6) / 3)
    assert v["label"] == "fake" and v["faces_scored"] == 4 and v["threshold"] == 0.5
    assert [f["score"] for f in v["top_frames"]] == [0.9, 0.6]
    assert v["top_frames"][0] == {"time_s": 6.0, "box": [10.0, 20.0, 110.0, 140.0], "score": 0.9}
    assert "pw" not in v["url"] and "abc" not in v["url"]
    assert verdict(scored, threshold=0.7)["label"] == "real"


def test_no_faces_and_errors():
    v = validate_verdict(verdict([]))
    assert v["label"] == "no_face" and v["fake_probability"] is None and v["faces_scored"] == 0
    e = validate_verdict(verdict([ScoredFace(6.0, FACE, 0.9)], error="TimeoutError: detector"))
    assert e["label"] == "error" and e["fake_probability"] is None and e["top_frames"] == []
    assert e["warnings"] == ["w", "scoring failed: TimeoutError: detector"]
