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


def test_untrained_gap_dropped_and_skipped_are_said():
    scored = [ScoredFace(6.0, FACE, 0.9)]
    kw = dict(job_id="j", url="https://example.com/v.mp4", clip_index=3, start_s=6.0, end_s=8.0,
              threshold=0.5, model="pel-test", warnings=[], top_k=2, latency_s=0.1)
    u = validate_verdict(make_verdict(frames_sampled=4, scored=scored, trained=False, **kw))
    assert u["label"] == "untrained" and u["fake_probability"] == pytest.approx(0.9)
    g = validate_verdict(make_verdict(frames_sampled=0, scored=[], frames_dropped=5, **kw))
    assert g["label"] == "gap" and g["frames_dropped"] == 5
    assert any("5 sampled frame(s) dropped" in w for w in g["warnings"])
    s = validate_verdict(make_verdict(frames_sampled=4, scored=scored, faces_skipped=3, **kw))
    assert s["label"] == "fake" and s["faces_skipped"] == 3
    assert any("3 face(s) beyond max_faces_per_frame" in w for w in s["warnings"])


def test_scoring_errors_carry_no_ray_internals():
    from workers.pipeline import scoring_error

    class ActorDiedError(Exception):
        pass

    text = scoring_error(ActorDiedError("The actor 7f3a9c... pid=4242 ip=10.0.0.3 died"))
    assert text == "the detector replica died or is restarting"
    assert "pid" not in scoring_error(TimeoutError("pid=1")) and "10.0" not in scoring_error(ValueError("10.0.0.3"))
