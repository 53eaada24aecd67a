"""Training building blocks: metrics against scikit-learn, self-blended images, dataset adapters
(layouts, official splits, malformed input reported with paths), calibration, perturbations,
frame sampling from real encoded video."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from media import astronaut, make_face_video
from training import metrics
from training.calibrate import fit_calibration, fit_temperature, threshold_for_fpr
from training.datasets import DatasetError, load_sources
from training.evaluate import parse_perturbations, perturb
from training.media import even_indices, video_frames
from training.sbi import face_mask, self_blend


# ----------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("seed", range(5))
def test_auc_roc_eer_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = y * rng.uniform(0, 1.5) + rng.normal(0, 1, n)
    if seed % 2:
        s = np.round(s, 1)  # many ties
    assert metrics.auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, thr = metrics.roc_curve(y, s)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    # EER from scikit-learn's curve, interpolated where FNR crosses FPR.
    fnr = 1 - sk_tpr
    i = np.nonzero(fnr - sk_fpr <= 0)[0][0]
    d0, d1 = fnr[i - 1] - sk_fpr[i - 1], fnr[i] - sk_fpr[i]
    ref = sk_fpr[i - 1] + d0 / (d0 - d1) * (sk_fpr[i] - sk_fpr[i - 1])
    assert metrics.eer(y, s) == pytest.approx(ref, abs=1e-12)
    p = 1 / (1 + np.exp(-s))
    m = metrics.binary_metrics(y, p, 0.5)
    assert m["acc"] == pytest.approx(((p >= 0.5) == y).mean())
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))


def test_metric_edge_cases():
    assert metrics.auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert metrics.eer([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert metrics.eer([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both"):
        metrics.roc_curve([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="labels"):
        metrics.auc([0, 2], [0.2, 0.3])
    m = metrics.binary_metrics([0, 0], [0.2, 0.7])
    assert "auc" not in m and m["fpr"] == 0.5


def test_video_level_mean_and_ece():
    ids, y, p = metrics.video_level(["a", "a", "b", "b", "b"], [0, 0, 1, 1, 1], [0.2, 0.4, 0.9, 0.6, 0.6])
    assert ids == ["a", "b"] and y.tolist() == [0, 1]
    np.testing.assert_allclose(p, [0.3, 0.7])
    with pytest.raises(ValueError, match="different labels"):
        metrics.video_level(["a", "a"], [0, 1], [0.1, 0.2])
    # Perfectly calibrated in each bin -> ECE 0; constant 0.9 on all-real -> 0.9.
    assert metrics.expected_calibration_error([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0)
    assert metrics.expected_calibration_error([0, 0], [0.9, 0.9]) == pytest.approx(0.9)


# ----------------------------------------------------------------------------- calibration
def test_temperature_and_threshold():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 4000)
    true_logit = (2 * y - 1) * 1.5 + rng.normal(0, 1, y.size)
    labels = (rng.random(y.size) < 1 / (1 + np.exp(-true_logit))).astype(int)
    t = fit_temperature(true_logit * 3.0, labels)  # over-confident by 3x
    assert t == pytest.approx(3.0, rel=0.1)
    p = 1 / (1 + np.exp(-true_logit * 3.0))
    after = 1 / (1 + np.exp(-true_logit * 3.0 / t))
    assert metrics.expected_calibration_error(labels, after) < metrics.expected_calibration_error(labels, p)
    real = rng.uniform(0, 1, 1000)
    thr = threshold_for_fpr(real, 0.01)
    assert (real >= thr).mean() <= 0.01 and (real >= np.sort(real)[-11]).mean() > 0.01
    with pytest.raises(ValueError):
        fit_temperature(np.zeros(3), np.zeros(3))


def test_platt_fit_recovers_scale_and_offset_and_removes_the_split_prior():
    """Balanced data: u | fake ~ N(1, 1), u | real ~ N(-1, 1), so the posterior logit is 2u.
    The split keeps every fake but a quarter of the reals (80 % fakes); the model reports
    z = 3 (2u - 1). Fitted to the split as it is, Platt finds T = 3 and b = 1 + log(4) (the
    split's share of fakes); weighted to a 50 % prior the share drops out (b = 1);
    temperature scaling cannot express the offset (b = 0)."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 40000)
    u = rng.normal(2 * y - 1, 1.0)
    keep = (y == 1) | (rng.random(y.size) < 0.25)
    labels, z = y[keep], 3 * (2 * u[keep] - 1)
    assert labels.mean() == pytest.approx(0.8, abs=0.01)
    t, b = fit_calibration(z, labels, "platt", prior=None)
    assert t == pytest.approx(3.0, rel=0.05)
    assert b == pytest.approx(1 + np.log(labels.mean() / (1 - labels.mean())), abs=0.08)
    t, b = fit_calibration(z, labels, "platt", prior=0.5)
    assert t == pytest.approx(3.0, rel=0.05) and b == pytest.approx(1.0, abs=0.08)
    t, b = fit_calibration(z, labels, "temperature", prior=0.5)
    assert b == 0.0
    # Reference: scikit-learn's unpenalised logistic regression on the logit, balanced weights.
    from sklearn.linear_model import LogisticRegression

    ref = LogisticRegression(C=np.inf, class_weight="balanced", tol=1e-10, max_iter=1000)
    ref.fit(z[:, None], labels)
    t, b = fit_calibration(z, labels, "platt", prior=0.5)
    assert 1 / t == pytest.approx(ref.coef_[0, 0], rel=1e-4)
    assert b == pytest.approx(ref.intercept_[0], abs=1e-4)
    with pytest.raises(ValueError, match="unknown calibration method"):
        fit_calibration(z, labels, "isotonic")


def test_ece_weighted_to_a_prior_equals_ece_of_the_rebalanced_sample():
    rng = np.random.default_rng(2)
    labels = np.array([0] * 30 + [1] * 10)
    probs = rng.uniform(0, 1, labels.size)
    # Each fake counted three times: a sample with 50 % fakes.
    dup_labels = np.concatenate([labels, labels[labels == 1], labels[labels == 1]])
    dup_probs = np.concatenate([probs, probs[labels == 1], probs[labels == 1]])
    assert metrics.expected_calibration_error(labels, probs, prior=0.5) == pytest.approx(
        metrics.expected_calibration_error(dup_labels, dup_probs))
    assert metrics.expected_calibration_error(labels, probs, prior=0.25) == pytest.approx(
        metrics.expected_calibration_error(labels, probs))
    np.testing.assert_allclose(metrics.class_weights(labels, 0.5).sum(), 1.0)
    with pytest.raises(ValueError, match="real and fake"):
        metrics.class_weights(np.zeros(4), 0.5)


@pytest.mark.parametrize("seed", [0, 1])
def test_weighted_auc_matches_sklearn_with_sample_weights_and_ties(seed):
    from training.confidence import weighted_auc

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 400)
    s = np.round(rng.normal(y * 0.7, 1.0), 1)  # rounding makes ties
    w = rng.integers(0, 4, (3, 400)).astype(float)
    for row, got in zip(w, weighted_auc(y, s, w)):
        assert got == pytest.approx(roc_auc_score(y, s, sample_weight=row), abs=1e-12)
    assert weighted_auc(y, s, np.ones(400))[0] == pytest.approx(metrics.auc(y, s), abs=1e-12)


def test_cluster_bootstrap_resamples_whole_clusters_and_pairs_the_deltas():
    from training.confidence import auc_intervals, cluster_weights

    clusters = [f"c{i // 3}" for i in range(300)]  # 100 clusters of 3
    w = cluster_weights(clusters, 50, seed=1)
    assert w.shape == (50, 300) and (w.sum(axis=1) == 300).all()
    assert (w.reshape(50, 100, 3) == w.reshape(50, 100, 3)[:, :, :1]).all()  # a cluster moves whole
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    clean = rng.normal(y, 1.0)
    worse = clean + rng.normal(0, 0.4, 300)
    ci = auc_intervals(y, {"clean": clean, "worse": worse}, clusters, resamples=500, seed=0)
    lo, hi = ci["clean"]["auc"]
    assert lo < metrics.auc(y, clean) < hi and "delta_auc" not in ci["clean"]
    d_lo, d_hi = ci["worse"]["delta_auc"]
    assert d_lo < metrics.auc(y, worse) - metrics.auc(y, clean) < d_hi
    # paired: the delta's interval is narrower than either AUC's
    assert d_hi - d_lo < min(hi - lo, np.subtract(*ci["worse"]["auc"][::-1]))
    assert ci["resamples"] + ci["dropped"] == 500 and ci["clusters"] == 100
    assert auc_intervals(np.zeros(10), {"clean": np.ones(10)}, list("abcdefghij")) is None


# ----------------------------------------------------------------------------- SBI
def _crop(size=128):
    from PIL import Image

    return np.asarray(Image.fromarray(astronaut()[20:260, 130:370]).resize((size, size)))


def test_self_blend_properties():
    crop = _crop()
    a = self_blend(crop, np.random.default_rng(3))
    b = self_blend(crop, np.random.default_rng(3))
    c = self_blend(crop, np.random.default_rng(4))
    assert a.image.shape == crop.shape and a.image.dtype == np.uint8
    np.testing.assert_array_equal(a.image, b.image)  # deterministic by seed
    assert not np.array_equal(a.image, c.image)
    assert np.abs(a.image.astype(int) - crop).mean() > 0.5  # differs from its source
    # The blend is m*src + (1-m)*tgt, m is zero outside the face region (border band of the crop).
    m = a.mask[..., None]
    np.testing.assert_allclose(a.image, np.clip(np.rint(m * a.source + (1 - m) * a.target), 0, 255), atol=0)
    band = np.ones(a.mask.shape, bool)
    band[12:-12, 12:-12] = False
    assert a.mask[band].max() == 0 and a.mask[64, 64] > 0.2
    outside = a.mask == 0
    np.testing.assert_array_equal(a.image[outside], a.target[outside])


def test_face_mask_from_landmarks_and_bad_input():
    rng = np.random.default_rng(0)
    lms = [[45, 50], [83, 50], [64, 70], [50, 88], [78, 88]]
    m = face_mask(128, rng, lms)
    assert m.dtype == np.float32 and 0 <= m.min() and m.max() <= 1
    assert m[70, 64] > 0 and m[:, :8].max() == 0 and m[:8].max() == 0
    with pytest.raises(ValueError, match="square uint8"):
        self_blend(np.zeros((64, 48, 3), np.uint8), rng)


# ----------------------------------------------------------------------------- perturbations
def test_perturbations_deterministic():
    crops = np.stack([_crop(64)] * 2)
    for kind, strength in parse_perturbations("all").items():
        a, b = perturb(crops, kind, strength, 1), perturb(crops, kind, strength, 1)
        assert a.shape == crops.shape and a.dtype == np.uint8 and not np.array_equal(a, crops)
        np.testing.assert_array_equal(a, b)
    sp = perturb(crops, "salt_pepper", 0.05)
    changed = (sp != crops).any(-1)
    assert 0.02 < changed.mean() < 0.08 and set(np.unique(sp[changed])) <= {0, 255}
    assert parse_perturbations("jpeg:70,salt_pepper") == {"jpeg": 70.0, "salt_pepper": 0.01}
    with pytest.raises(ValueError, match="unknown perturbation"):
        parse_perturbations("fog")


# ----------------------------------------------------------------------------- media
def test_even_frames_from_real_video(tmp_path):
    path = make_face_video(tmp_path / "v.mp4", seconds=1.0, fps=10, size=(160, 120))
    frames = video_frames(path, 4)
    assert [i for i, _ in frames] == even_indices(10, 4) == [0, 3, 6, 9]
    assert all(f.shape == (120, 160, 3) and f.dtype == np.uint8 for _, f in frames)
    assert len(video_frames(path, 50)) == 10
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(ValueError, match="bad.mp4"):
        video_frames(bad, 4)


# ----------------------------------------------------------------------------- adapters
def _touch(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


def test_ffpp_layout_splits_and_missing_files(tmp_path):
    for v in ("000", "001"):
        _touch(tmp_path / f"original_sequences/youtube/c40/videos/{v}.mp4")
    for m in ("Deepfakes", "FaceSwap"):
        _touch(tmp_path / f"manipulated_sequences/{m}/c40/videos/000_001.mp4")
        _touch(tmp_path / f"manipulated_sequences/{m}/c40/videos/001_000.mp4")
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits/train.json").write_text(json.dumps([["000", "001"]]))
    (tmp_path / "splits/val.json").write_text("[]")
    (tmp_path / "splits/test.json").write_text("[]")
    src = load_sources("ffpp", tmp_path, compression="LQ", methods=["Deepfakes", "FaceSwap"])
    assert sorted(s.id for s in src) == ["Deepfakes/000_001", "Deepfakes/001_000", "FaceSwap/000_001",
                                         "FaceSwap/001_000", "youtube/000", "youtube/001"]
    assert {s.label for s in src if s.method == "youtube"} == {0} and {s.split for s in src} == {"train"}
    assert {s.group for s in src} == {"000_001"}  # a pair's originals and fakes: one cluster
    (tmp_path / "splits/test.json").write_text(json.dumps([["002", "003"]]))
    with pytest.raises(DatasetError) as err:
        load_sources("ffpp", tmp_path, compression="c40", methods=["Deepfakes"])
    assert "missing files" in str(err.value) and "youtube/c40/videos/002.mp4" in str(err.value)
    assert any(p.endswith("Deepfakes/c40/videos/003_002.mp4") for p in err.value.paths)
    (tmp_path / "splits/val.json").write_text("{not json")
    with pytest.raises(DatasetError, match="val.json"):
        load_sources("ffpp", tmp_path, compression="c40", methods=["Deepfakes"])
    with pytest.raises(DatasetError, match="NeuralTextures/c40/videos"):
        load_sources("ffpp", tmp_path, compression="c40")


def test_wilddeepfake_malformed_archives(tmp_path):
    import io

    for sub in ("real_train", "fake_train", "real_test", "fake_test"):
        (tmp_path / sub).mkdir()
    bad = tmp_path / "real_train" / "1.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        info = tarfile.TarInfo("seq/frame_a.png")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DatasetError, match="too few archives for a validation split"):
        load_sources("wilddeepfake", tmp_path)
    with pytest.raises(DatasetError) as err:
        load_sources("wilddeepfake", tmp_path, val_fraction=0)
    assert "1.tar.gz:seq/frame_a.png" in str(err.value)
    bad.write_bytes(b"truncated")
    with pytest.raises(DatasetError, match="(?s)unreadable archive.*1.tar.gz"):
        load_sources("wilddeepfake", tmp_path, val_fraction=0)
    bad.unlink()
    with pytest.raises(DatasetError, match="real_train"):
        load_sources("wilddeepfake", tmp_path)


def test_celebdf_dfdc_folder_csv(tmp_path):
    c = tmp_path / "celeb"
    for rel in ("Celeb-real/id0_0000.mp4", "Celeb-real/id1_0001.mp4", "YouTube-real/00000.mp4",
                "Celeb-synthesis/id0_id1_0000.mp4"):
        _touch(c / rel)
    (c / "List_of_testing_videos.txt").write_text("1 Celeb-real/id0_0000.mp4\n0 Celeb-synthesis/id0_id1_0000.mp4\n")
    src = {s.id: s for s in load_sources("celebdf", c)}
    assert src["Celeb-real/id0_0000"].split == "test" and src["Celeb-real/id0_0000"].label == 0
    assert src["Celeb-synthesis/id0_id1_0000"].label == 1 and src["Celeb-real/id1_0001"].split in ("train", "val")
    (c / "List_of_testing_videos.txt").write_text("real Celeb-real/id0_0000.mp4\n")
    with pytest.raises(DatasetError, match="List_of_testing_videos.txt:1"):
        load_sources("celebdf", c)

    d = tmp_path / "dfdc"
    _touch(d / "dfdc_train_part_0/a.mp4")
    _touch(d / "dfdc_train_part_0/b.mp4")
    (d / "dfdc_train_part_0/metadata.json").write_text(json.dumps(
        {"a.mp4": {"label": "REAL"}, "b.mp4": {"label": "FAKE", "original": "a.mp4"}}))
    _touch(d / "test/c.mp4")
    (d / "test/labels.csv").write_text("filename,label\nc.mp4,1\n")
    src = {s.id: s for s in load_sources("dfdc", d)}
    assert (src["dfdc_train_part_0/a"].label, src["dfdc_train_part_0/b"].label) == (0, 1)
    assert src["dfdc_train_part_0/a"].split == src["dfdc_train_part_0/b"].split  # fake follows its original
    assert src["dfdc_train_part_0/a"].group == src["dfdc_train_part_0/b"].group == "a.mp4"
    assert src["test/c"].label == 1 and src["test/c"].split == "test"
    (d / "test/labels.csv").write_text("filename,label\nc.mp4,maybe\nmissing.mp4,0\n")
    with pytest.raises(DatasetError, match="labels.csv:2"):
        load_sources("dfdc", d)
    (d / "test/labels.csv").write_text("filename,label\nmissing.mp4,0\n")
    with pytest.raises(DatasetError, match="missing.mp4"):
        load_sources("dfdc", d)

    f = tmp_path / "plain"
    _touch(f / "real/a.jpg")
    _touch(f / "fake/b.mp4")
    kinds = {s.id: (s.kind, s.label) for s in load_sources("folder", f)}
    assert kinds == {"real/a": ("image", 0), "fake/b": ("video", 1)}
    _touch(f / "fake/notes.txt")
    with pytest.raises(DatasetError, match="notes.txt"):
        load_sources("folder", f)

    (tmp_path / "list.csv").write_text("path,label,split\nplain/real/a.jpg,real,train\nplain/fake/zz.mp4,fake,test\n")
    with pytest.raises(DatasetError, match="zz.mp4"):
        load_sources("csv", tmp_path / "list.csv")
    (tmp_path / "list.csv").write_text("path,label\nplain/real/a.jpg,sort-of\n")
    with pytest.raises(DatasetError, match="list.csv:2"):
        load_sources("csv", tmp_path / "list.csv")


def _prepared(tmp_path, labels_by_split: dict[str, list[int]], size: int = 64) -> Path:
    """A hand-made `pel prepare` output: png crops and their index rows."""
    from PIL import Image
    from model_utils import face_batch

    rows = []
    (tmp_path / "crops").mkdir(parents=True)
    for split, labels in labels_by_split.items():
        for i, (label, crop) in enumerate(zip(labels, face_batch(len(labels), size, seed=len(rows)))):
            path = f"crops/{split}-{i}.png"
            Image.fromarray(crop).save(tmp_path / path)
            rows.append({"video": f"{split}-{i}", "frame": 0, "label": label, "split": split,
                         "method": "", "path": path})
    (tmp_path / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_int8_calibration_crops_take_both_classes(tmp_path):
    from pel_model.quantize import load_calibration_crops
    from training.data import calibration_crops

    both = _prepared(tmp_path / "both", {"val": [0] * 30 + [1] * 6, "train": [1] * 10})
    crops = calibration_crops(both, "val", limit=16)
    assert crops.shape == (16, 64, 64, 3)  # all 6 fakes of val, 10 of its 30 real crops
    assert len(calibration_crops(both, "val", limit=100)) == 36
    resized = load_calibration_crops(both, 32, limit=16)  # the service's entry point
    assert resized.shape == (16, 32, 32, 3) and resized.dtype == np.uint8
    real_only = _prepared(tmp_path / "real", {"val": [0] * 12})
    crops = calibration_crops(real_only, "val", limit=16)  # 8 real + 8 self-blended twins
    assert crops.shape == (16, 64, 64, 3) and not np.array_equal(crops[:8], crops[8:])
    fake_only = _prepared(tmp_path / "fake", {"val": [1] * 12})
    with pytest.raises(ValueError, match="no real crops"):
        calibration_crops(fake_only, "val")
    with pytest.raises(ValueError, match="no crops in split"):
        calibration_crops(both, "test")
    with pytest.raises(FileNotFoundError):
        load_calibration_crops(tmp_path / "missing", 64)
