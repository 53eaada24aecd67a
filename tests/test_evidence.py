"""Evidence for moderators without a service: Grad-CAM maps, the evidence store and its
retention, the stream worker's evidence step, the review desk (real redis-server) and the
feedback export read back by `pel prepare`'s CSV adapter."""
from __future__ import annotations

import io
import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from model_utils import SMALL, face_batch, small_model
from pel_model.config import AppConfig, EvidenceConfig
from pel_model.faces import Face
from pel_model.grad_cam import grad_cam, overlay, pel_heatmaps
from workers.evidence import EvidenceRecorder
from workers.evidence_store import EvidenceStore, png_bytes, track_key
from workers.feedback import export_feedback
from workers.review import ReviewDesk, ReviewError
from workers.verdict import ScoredFace, make_verdict
from workers.verdicts import VerdictStore


class RedFinder(nn.Module):
    """Its logit is the mean 'redness' of a coarse feature map: evidence sits where red is."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, -1.0, -1.0], [0.0, 1.0, 0.0]])[..., None, None])
            self.conv.bias.zero_()
        self.features = nn.Sequential(nn.ReLU(), nn.AvgPool2d(4))

    def forward(self, x):
        a = self.features(self.conv(x.permute(0, 3, 1, 2).float() / 255))
        return a[:, 0].mean((1, 2))  # channel 1 (green) does not count


def test_grad_cam_puts_the_map_where_the_evidence_is():
    img = np.full((1, 64, 64, 3), 128, np.uint8)
    img[0, 40:56, 8:24] = (255, 0, 0)  # a red square, bottom left
    img[0, 4:20, 40:60] = (0, 255, 0)  # a green one the logit ignores
    model = RedFinder()
    [cam] = grad_cam(model, {"f": model.features}, torch.from_numpy(img), (64, 64))["f"]
    assert cam.shape == (64, 64) and float(cam.max()) == pytest.approx(1.0)
    inside = float(cam[40:56, 8:24].sum()) / float(cam.sum())
    assert inside > 0.8, inside
    y, x = divmod(int(cam.argmax()), 64)
    assert 40 <= y < 56 and 8 <= x < 24
    assert float(cam[4:20, 40:60].max()) < 0.05  # nothing where only green is


def test_pel_heatmaps_shape_range_and_dependence_on_the_face():
    model = small_model(seed=3)
    crops = face_batch(2, SMALL.input_size, seed=5)
    crops[1] = crops[1][::-1]  # an upside-down face: a different map
    maps = pel_heatmaps(model, crops)
    assert set(maps) == {"rgb", "frequency", "combined"}
    for name, m in maps.items():
        assert m.shape == (2, 224, 224) and m.dtype == np.float32, name
        assert np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1 + 1e-6, name
    np.testing.assert_allclose(maps["combined"], (maps["rgb"] + maps["frequency"]) / 2)
    assert np.abs(maps["combined"][0] - maps["combined"][1]).mean() > 0.01
    assert all(p.grad is None for p in model.parameters())  # nothing kept from the backward
    over = overlay(crops[0], maps["combined"][0])
    assert over.shape == crops[0].shape and over.dtype == np.uint8


def test_store_keys_cannot_leave_the_store(tmp_path):
    store = EvidenceStore(EvidenceConfig(dir=tmp_path))
    for bad in ("../x.png", "a/../../x", "/etc/passwd", "a//b", ".hidden/x", "a/b c", ""):
        with pytest.raises(ValueError):
            store.path(bad)
    key = track_key("..", 3, 2) + "/face.png"  # job ids may be "..": still inside the store
    assert key == "job-../clip-000003/track-2/face.png"
    store.put(key, b"x")
    assert store.path(key).resolve().is_relative_to(tmp_path.resolve())
    assert store.get(key) == b"x" and store.exists(key) and store.get("job-x/none.png") is None


def test_retention_drops_old_files_then_the_oldest_over_budget(tmp_path):
    store = EvidenceStore(EvidenceConfig(dir=tmp_path, retention_hours=1, max_megabytes=0.0025))
    now = time.time()
    for i, age_h in enumerate([5, 0.5, 0.4, 0.3, 0.1]):  # 1,000 bytes each
        key = f"job-j/clip-00000{i}/track-1/face.png"
        store.put(key, b"\0" * 1000)
        os.utime(store.path(key), (now - age_h * 3600,) * 2)
    removed = store.sweep(now)
    # the 5 h old file is past retention; then 4,000 bytes > 2,500: the two oldest go
    assert removed == {"files": 3, "bytes": 3000}
    left = sorted(p.parent.parent.name for p in tmp_path.rglob("*.png"))
    assert left == ["clip-000003", "clip-000004"]
    assert not (tmp_path / "job-j" / "clip-000000").exists()  # empty folders go too
    assert store.sweep(now) == {"files": 0, "bytes": 0}


def _scored(crops) -> list[ScoredFace]:
    """Two tracks over 4 frames: track 1 suspicious, track 2 not."""
    out = []
    for i in range(4):
        out.append(ScoredFace(i * 0.5, Face(10, 10, 60, 60, 0.9), 0.9 - 0.01 * i, 1, crops[i]))
        out.append(ScoredFace(i * 0.5, Face(100, 10, 150, 60, 0.9), 0.1, 2, crops[4 + i]))
    return out


def _verdict(scored, job="job-a", clip=0, url="rtsp://user:secret@cam.example/1?token=abc"):
    return make_verdict(job_id=job, url=url, clip_index=clip, start_s=0.0, end_s=2.0,
                        frames_sampled=4, scored=scored, threshold=0.5, model="m", warnings=[],
                        top_k=3, latency_s=0.1)


def test_recorder_stores_the_exact_crop_of_flagged_tracks(tmp_path):
    crops = face_batch(8, 224, seed=2)
    scored = _scored(crops)
    v = _verdict(scored)
    rec = EvidenceRecorder(EvidenceConfig(dir=tmp_path, heatmaps=False))
    rec.attach(v, scored)
    t1, t2 = v["tracks"]
    assert (t1["label"], t2["label"]) == ("fake", "real")
    assert t1["evidence"] == {"face": "job-job-a/clip-000000/track-1/face.png", "heatmap": None}
    assert "evidence" not in t2
    stored = np.asarray(Image.open(io.BytesIO(rec.store.get(t1["evidence"]["face"]))))
    np.testing.assert_array_equal(stored, crops[0])  # the top-scored face, lossless
    v_all = _verdict(scored, clip=1)
    EvidenceRecorder(EvidenceConfig(dir=tmp_path, heatmaps=False, tracks="all")).attach(v_all, scored)
    assert all("evidence" in t for t in v_all["tracks"])
    v_off = _verdict(scored, clip=2)
    EvidenceRecorder(EvidenceConfig(dir=tmp_path, tracks="off")).attach(v_off, scored)
    assert not any("evidence" in t for t in v_off["tracks"])


def _desk(redis_url, tmp_path, **review):
    cfg = AppConfig.model_validate({"redis": {"url": redis_url, "prefix": "rv"},
                                    "evidence": {"dir": str(tmp_path), "heatmaps": False},
                                    "review": review})
    return cfg, ReviewDesk(cfg, redis_url)


def test_review_desk_lists_flagged_clips_and_records_decisions(redis_client, redis_url, tmp_path):
    cfg, desk = _desk(redis_url, tmp_path)
    store = VerdictStore(redis_client, cfg.redis)
    rec = EvidenceRecorder(cfg.evidence)
    crops = face_batch(8, 224, seed=4)
    for clip in range(3):
        scored = _scored(crops) if clip != 1 else [
            ScoredFace(0.0, Face(10, 10, 60, 60, 0.9), 0.1, 1, crops[0])] * 3  # a real clip
        v = _verdict(scored, clip=clip)
        rec.attach(v, scored)
        store.write(v)
    listed = desk.flagged()
    assert [c["clip_index"] for c in listed["clips"]] == [2, 0]  # fakes only, newest first
    assert listed["grafana_url"] == cfg.review.grafana_url
    text = json.dumps(listed)
    assert "secret" not in text and "abc" not in text and "cam.example" in text
    track = listed["clips"][0]["tracks"][0]
    assert track["face"] == "evidence/job-job-a/clip-000002/track-1/face.png"
    assert track["heatmap"] is None and track["review"] is None
    assert desk.evidence_file(track["face"][len("evidence/"):]).is_file()

    record = desk.mark({"job_id": "job-a", "clip_index": 2, "track_id": 1, "decision": "confirmed"})
    assert record["decision"] == "confirmed" and record["face"].endswith("track-1/face.png")
    stored = json.loads(redis_client.hget("rv:reviews", "job-a:2:1"))
    assert stored["decision"] == "confirmed" and stored["fake_probability"] == record["fake_probability"]
    assert desk.flagged()["clips"][0]["tracks"][0]["review"]["decision"] == "confirmed"
    desk.mark({"job_id": "job-a", "clip_index": 0, "track_id": 1, "decision": "false_positive"})
    for bad, status in ((["x"], 400), ({"job_id": "job-a", "clip_index": 2, "track_id": 1,
                                        "decision": "maybe"}, 400),
                        ({"job_id": "../x", "clip_index": 2, "track_id": 1,
                          "decision": "confirmed"}, 400),
                        ({"job_id": "job-a", "clip_index": 2, "track_id": 9,
                          "decision": "confirmed"}, 404)):
        with pytest.raises(ReviewError) as err:
            desk.mark(bad)
        assert err.value.status == status
    for bad_key in ("../../etc/passwd", "job-x/nothing.png"):
        with pytest.raises(ReviewError):
            desk.evidence_file(bad_key)

    # feedback export -> the CSV adapter of `pel prepare` reads it back
    from training.datasets import csv_list
    out = export_feedback(redis_client, cfg, tmp_path / "feedback")
    assert (out["faces"], out["fake"], out["real"], out["without_evidence"]) == (2, 1, 1, 0)
    sources = csv_list(tmp_path / "feedback" / "index.csv")
    assert sorted(s.label for s in sources) == [0, 1]
    assert len({s.split for s in sources}) == 1  # one job: one split
    fake = next(s for s in sources if s.label == 1)
    np.testing.assert_array_equal(np.asarray(Image.open(fake.path)), crops[0])


def test_review_access_rules(redis_url, tmp_path):
    _, open_desk = _desk(redis_url, tmp_path)
    open_desk.authorize("127.0.0.1", {}, {}, {})
    open_desk.authorize("::1", {}, {}, {})
    with pytest.raises(ReviewError) as err:
        open_desk.authorize("10.1.2.3", {}, {}, {})
    assert err.value.status == 403 and "review.token" in str(err.value)
    with pytest.raises(ReviewError) as err:  # a cross-site form cannot set this header
        open_desk.authorize("127.0.0.1", {}, {}, {}, write=True)
    assert err.value.status == 403
    open_desk.authorize("127.0.0.1", {"x-pel-review": "1"}, {}, {}, write=True)

    token = "t0k3n-for-the-review-desk"
    _, desk = _desk(redis_url, tmp_path, token=token)
    for host, headers, query, cookies in (("127.0.0.1", {}, {}, {}),
                                          ("10.1.2.3", {"authorization": "Bearer nope"}, {}, {})):
        with pytest.raises(ReviewError) as err:
            desk.authorize(host, headers, query, cookies)
        assert err.value.status == 401
    desk.authorize("10.1.2.3", {"authorization": f"Bearer {token}"}, {}, {})
    desk.authorize("10.1.2.3", {}, {"token": token}, {})
    desk.authorize("10.1.2.3", {}, {}, {"pel_review_token": token})
    _, off = _desk(redis_url, tmp_path, enabled=False)
    with pytest.raises(ReviewError) as err:
        off.authorize("127.0.0.1", {}, {}, {})
    assert err.value.status == 404


def test_png_is_lossless():
    crop = face_batch(1, 224, seed=9)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(crop)))), crop)
