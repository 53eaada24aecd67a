"""End to end on tiny real datasets: prepare (Ray tasks, CenterFace) -> Ray Train (2 CPU workers,
interrupted and resumed) -> calibrate -> evaluate -> ONNX export -> the service's `load_scorer`.

Videos are genuinely encoded with PyAV (libx264) from real face photos: scikit-image's astronaut
(shifted and colour-jittered per identity) plus a few real photos from ../shared/data when
present. Fakes are made by self-blending the face region of the photo.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pel_model.checkpoint import read_meta  # noqa: E402
from pel_model.config import DetectorConfig, FaceConfig, ModelConfig, TrainConfig  # noqa: E402
from media import astronaut, make_face_video  # noqa: E402
from training.cli import load_train_config  # noqa: E402
from training.datasets import load_sources  # noqa: E402
from training.sbi import self_blend  # noqa: E402

SIZE = 96
SHARED = Path(os.environ.get("PEL_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
FACE = (slice(30, 250), slice(150, 340))  # the astronaut's face (rows, cols) in the 512 px photo


def _photos(n: int) -> list[np.ndarray]:
    """n identities: astronaut variants, the last ones replaced by real photos when available."""
    rng = np.random.default_rng(1)
    base = astronaut()
    out = []
    for i in range(n):
        img = np.roll(base, (int(rng.integers(-12, 12)), int(rng.integers(-12, 12))), (0, 1))
        out.append(np.clip(img.astype(np.int16) + rng.integers(-25, 26, 3), 0, 255).astype(np.uint8))
    shared = sorted((SHARED / "faces-real" / "images").glob("*.jpg"))[:2] if SHARED.is_dir() else []
    if shared:
        from PIL import Image

        for k, p in enumerate(shared):  # pad the tight crops so the face has context
            face = np.asarray(Image.open(p).convert("RGB").resize((256, 256)))
            out[-1 - k] = np.pad(face, ((128, 128), (128, 128), (0, 0)), constant_values=90)
    return out


def _fake(photo: np.ndarray, seed: int) -> np.ndarray:
    img = photo.copy()
    region = np.ascontiguousarray(img[FACE[0], FACE[1].start:FACE[1].start + 220])
    img[FACE[0], FACE[1].start:FACE[1].start + 220] = self_blend(region, np.random.default_rng(seed)).image
    return img


def _video(path: Path, photo: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_face_video(path, [photo], seconds=1.0, fps=8, size=(480, 360))


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _cfg(tmp: Path, **kw) -> TrainConfig:
    base = dict(model=ModelConfig(backbone="efficientnet_b0", input_size=SIZE, pretrained=False),
                faces=FaceConfig(), batch_size=8, num_workers=2, frames_per_video=3,
                steps_per_epoch=2, storage_path=tmp / "runs", run_name="t", eval_batch_size=16,
                loader_threads=1, augment=True, target_fpr=0.1)
    base.update(kw)
    return TrainConfig(**base)


def _calibrate_evaluate_serve(tmp: Path, best: Path, prepared: Path, eval_split: str,
                              perturbations: dict, export: bool) -> None:
    import torch

    from pel_model.checkpoint import load_checkpoint
    from pel_model.export import export_onnx
    from pel_model.scorer import load_scorer, onnx_artifact
    from training.calibrate import calibrate
    from training.data import load_crops, read_index
    from training.evaluate import evaluate

    cal = calibrate(best, prepared, "val", target_fpr=0.1)
    meta = read_meta(cal.checkpoint)
    assert meta.calibrated and meta.trained
    assert meta.temperature == pytest.approx(cal.temperature) and cal.temperature > 0
    assert cal.method == "platt" and meta.logit_bias == pytest.approx(cal.logit_bias)
    assert meta.threshold == pytest.approx(cal.threshold) and 0 < cal.threshold < 1
    assert cal.diagram.stat().st_size > 1000
    assert "calibration" in meta.provenance

    # With export: `pel evaluate --int8-calibration` also measures the INT8 graph's cost.
    report = evaluate(cal.checkpoint, prepared, tmp / "eval", eval_split, perturbations,
                      batch_size=16, int8_calibration=prepared if export else None)
    saved = json.loads((tmp / "eval" / "report.json").read_text())
    assert saved["clean"]["frame"]["n"] == len(read_index(prepared, eval_split))
    for level in ("frame", "video"):
        assert 0 <= saved["clean"][level]["auc"] <= 1 and 0 <= saved["clean"][level]["acc"] <= 1
    assert set(report["robustness"]) == set(perturbations)
    assert saved["logit_bias"] == pytest.approx(cal.logit_bias)
    if saved["clean"]["frame"]["n_real"] and saved["clean"]["frame"]["n_fake"]:
        assert saved["ece_at_prior"]["prior"] == 0.5 and 0 <= saved["ece_at_prior"]["ece"] <= 1
    for d in report["robustness"].values():
        assert d["delta"]["frame"]["auc"] == pytest.approx(d["frame"]["auc"] - saved["clean"]["frame"]["auc"])
    assert (tmp / "eval" / "roc.png").stat().st_size > 1000
    assert (tmp / "eval" / "scores.png").stat().st_size > 1000
    if export:
        int8 = saved["int8"]
        assert int8["n"] == saved["clean"]["frame"]["n"] and int8["threshold"] == pytest.approx(cal.threshold)
        val = read_index(prepared, "val")  # both classes, or real crops and self-blended twins
        both = len({r["label"] for r in val}) == 2
        assert int8["calibration_crops"] == (len(val) if both else 2 * len(val))
        assert 0 <= int8["decision_agreement"] <= 1 and int8["max_abs_prob_change"] < 0.5
        assert int8["auc_drop"] == pytest.approx(int8["auc_fp32"] - int8["auc_int8"])
        assert int8["auc_fp32"] == pytest.approx(saved["clean"]["frame"]["auc"], abs=1e-3)
    else:
        assert "int8" not in saved

    # Export ONNX where the service looks for it, then load it the way the service does (the
    # export is slow on 2 CPU cores, so the second layout uses the torch backend).
    art = tmp / "artifacts"
    model, _ = load_checkpoint(cal.checkpoint)
    if export:
        onnx = export_onnx(model, onnx_artifact(DetectorConfig(checkpoint=cal.checkpoint, artifacts_dir=art)))
        assert onnx.exists()
    scorer = load_scorer(DetectorConfig(checkpoint=cal.checkpoint, artifacts_dir=art,
                                        backend="onnxruntime" if export else "torch"), device="cpu")
    assert scorer.warnings == [] and scorer.threshold == pytest.approx(cal.threshold)
    crops = load_crops(prepared, read_index(prepared, eval_split)[:4])
    probs = scorer.probabilities(crops)
    with torch.no_grad():
        ref = torch.sigmoid(model(torch.from_numpy(crops)).double() / meta.temperature
                            + meta.logit_bias).numpy()
    assert probs.shape == (4,)
    np.testing.assert_allclose(probs, ref, atol=1e-3)
    if export:  # the service's INT8 path: Q/DQ graph calibrated on the prepared val split
        int8 = load_scorer(DetectorConfig(checkpoint=cal.checkpoint, artifacts_dir=art,
                                          backend="onnxruntime", precision="int8",
                                          calibration_dir=prepared), device="cpu")
        assert list(art.glob("pel-*.int8-*.onnx")) and int8.model_id.endswith("+onnxruntime:cpu:int8")
        assert np.abs(int8.probabilities(crops) - ref).max() < 0.2


def test_ffpp_prepare_train_resume_calibrate_evaluate_export(tmp_path, ray_cluster):
    from training.prepare import prepare
    from training.train import train

    root = tmp_path / "ffpp"
    photos = _photos(6)
    ids = [f"{i:03d}" for i in range(6)]
    for i, vid in enumerate(ids):
        _video(root / "original_sequences/youtube/c23/videos" / f"{vid}.mp4", photos[i])
    pairs = {"train": [["000", "001"]], "val": [["002", "003"]], "test": [["004", "005"]]}
    (root / "splits").mkdir()
    for split, ps in pairs.items():
        (root / "splits" / f"{split}.json").write_text(json.dumps(ps))
        for a, b in ps:
            for t, s in ((a, b), (b, a)):
                _video(root / "manipulated_sequences/Deepfakes/c23/videos" / f"{t}_{s}.mp4",
                       _fake(photos[int(t)], seed=int(t + s)))

    sources = load_sources("ffpp", root, compression="HQ", methods=["Deepfakes"])
    assert len(sources) == 12
    assert {s.split for s in sources if s.id == "Deepfakes/003_002"} == {"val"}
    cfg = _cfg(tmp_path)
    prepared = tmp_path / "prep"
    summary = prepare(sources, prepared, cfg, use_ray=True, progress=False, dataset="ffpp")
    assert summary.failed == {} and summary.no_face == [] and summary.videos == 12
    rows = [json.loads(x) for x in (prepared / "index.jsonl").read_text().splitlines()]
    assert len(rows) == summary.crops == 36  # 3 frames per video, one face each
    assert {r["frame"] for r in rows if r["video"] == "youtube/000"} == {0, 4, 7}
    assert all(len(r["box"]) == 5 and r["landmarks"] and r["path"].endswith(".png") for r in rows)
    # Resumable: a second run finds every video done and rebuilds the same index.
    again = prepare(sources, prepared, cfg, use_ray=True, progress=False, dataset="ffpp")
    assert again.skipped_done == 12 and again.crops == 36

    first = train(prepared, cfg.model_copy(update={"epochs": 1}))
    assert first.metrics["epoch"] == 0 and 0 <= first.metrics["val_auc"] <= 1
    meta = read_meta(first.last)
    assert meta.trained and not meta.calibrated and meta.provenance["epoch"] == 0
    resumed = train(prepared, cfg.model_copy(update={"epochs": 2}))
    assert resumed.metrics["epoch"] == 1  # continued after epoch 0, did not start over
    assert read_meta(resumed.last).provenance["epoch"] == 1
    assert read_meta(resumed.last).provenance["workers"] == 2
    history = read_meta(resumed.last).provenance["history"]  # the curve survives the resume
    assert [h["epoch"] for h in history] == [0, 1] and (resumed.run_dir / "curve.png").stat().st_size

    _calibrate_evaluate_serve(tmp_path, resumed.best, prepared, "test",
                              {"jpeg": 50, "gaussian_noise": 10}, export=True)


def _wdf_archive(path: Path, sequences: dict[str, list[np.ndarray]]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for seq, frames in sequences.items():
            for i, frame in enumerate(frames):
                buf = io.BytesIO()
                Image.fromarray(frame).save(buf, format="PNG")
                info = tarfile.TarInfo(f"{seq}/{i * 5}.png")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)


def _frames(photo: np.ndarray, n: int) -> list[np.ndarray]:
    from PIL import Image

    small = np.asarray(Image.fromarray(photo).resize((256, 256)))
    return [np.pad(np.roll(small, 2 * k, 1), ((32, 32), (64, 64), (0, 0)), constant_values=60)
            for k in range(n)]


def test_wilddeepfake_prepare_train_finetune_calibrate_evaluate_serve(tmp_path, ray_cluster):
    import torch
    from safetensors.torch import load_file

    from training.prepare import prepare
    from training.train import train

    root = tmp_path / "wdf"
    photos = _photos(4)
    for subset, label in (("real_train", 0), ("fake_train", 1), ("real_test", 0), ("fake_test", 1)):
        n_arch = 2 if subset.endswith("train") else 1
        for a in range(n_arch):
            ph = photos[(a + (2 if subset.endswith("test") else 0)) % 4]
            img = _fake(ph, a) if label else ph
            _wdf_archive(root / subset / f"{a + 1}.tar.gz",
                         {f"{subset}/{a + 1}/seq{k}": _frames(img, 4) for k in range(2)})
    sources = load_sources("wilddeepfake", root)
    assert len(sources) == 12 and all(s.kind == "frames" for s in sources)
    splits = {(s.method, s.split) for s in sources}
    assert ("real_train", "val") in splits and ("fake_train", "val") in splits
    assert ("real_train", "train") in splits and ("fake_test", "test") in splits
    cfg = _cfg(tmp_path, run_name="wdf", num_workers=1, batch_size=4, epochs=1, crop_format="jpg",
               frames_per_video=2)
    prepared = tmp_path / "prep"
    summary = prepare(sources, prepared, cfg, use_ray=True, progress=False, dataset="wilddeepfake")
    assert summary.failed == {} and summary.no_face == [] and summary.crops == 24
    rows = [json.loads(x) for x in (prepared / "index.jsonl").read_text().splitlines()]
    assert {r["frame"] for r in rows} == {0, 15}  # first and last of the frames 0, 5, 10, 15
    result = train(prepared, cfg)
    assert result.metrics["epoch"] == 0
    # Fine-tuning: a second run starts from the first one's weights. Its frozen stages keep
    # them exactly (a fresh network would hold the seed's random init, which run one trained).
    tuned = train(prepared, cfg.model_copy(update={"run_name": "wdf-tuned", "frozen_stages": 1,
                                                   "init_checkpoint": result.best}))
    assert read_meta(tuned.last).provenance["backbone_init"].startswith(f"checkpoint {result.best}")
    start, after = load_file(result.best), load_file(tuned.last)
    stage0 = [k for k in start if k.startswith("rgb.blocks.0.")]
    assert stage0 and all(torch.equal(start[k], after[k]) for k in stage0)
    assert any(not torch.equal(start[k], after[k]) for k in start if k.startswith("fc."))
    _calibrate_evaluate_serve(tmp_path, result.best, prepared, "test",
                              {"salt_pepper": 0.01, "gaussian_blur": 1.5}, export=False)


def test_cli_config_yaml_and_flags(tmp_path):
    (tmp_path / "t.yaml").write_text("epochs: 3\nmodel:\n  backbone: efficientnet_b0\n  input_size: 128\n")
    cfg = load_train_config(str(tmp_path / "t.yaml"), lr=1e-3, model={"input_size": 96, "backbone": None})
    assert (cfg.epochs, cfg.lr, cfg.model.backbone, cfg.model.input_size) == (3, 1e-3, "efficientnet_b0", 96)
    (tmp_path / "bad.yaml").write_text("epochs: 0\n")
    with pytest.raises(ValueError, match="epochs"):
        load_train_config(str(tmp_path / "bad.yaml"))
    from pel_model.cli import main

    assert main(["prepare", "--dataset", "ffpp", "--root", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "o"), "--no-ray"]) == 2
