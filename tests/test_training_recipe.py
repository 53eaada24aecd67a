"""Building blocks of the shipped training recipe: face-crop inputs that lose nothing, the
augmentations, CSV groups and dev splits, several datasets in one prepared folder, the
fine-tuning schedule, early stopping, calibration warnings, evaluation outputs."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from media import astronaut
from pel_model.config import AugmentConfig, FaceConfig, ModelConfig, TrainConfig
from pel_model.faces import crop_face, make_detector
from pel_model.faces.face_crop_input import crop_face_input, detector_config, locate_face
from training import augment as A
from training.datasets import combine, load_sources


@pytest.fixture(scope="module")
def detector():
    return make_detector(detector_config(FaceConfig()))


def _face_crop_of(frame: np.ndarray, face_detector) -> np.ndarray:
    """A tight 224 px dataset-style crop (chin and forehead cut) of the frame's face."""
    f = max(face_detector.detect(frame), key=lambda f: f.width * f.height)
    cx, cy = f.center
    s = int(0.85 * max(f.width, f.height))  # tighter than the face box: the face fills it
    return np.asarray(Image.fromarray(frame[int(cy - s / 2):int(cy + s / 2),
                                            int(cx - s / 2):int(cx + s / 2)]).resize((224, 224)))


# ----------------------------------------------------------------------------- face-crop mode
def test_a_face_filling_the_image_is_found_on_the_padded_canvas(detector):
    tight = _face_crop_of(astronaut(), make_detector(FaceConfig()))
    face, fell_back = locate_face(tight, detector)
    assert not fell_back and face.width > 150  # the face, at its own scale, not the canvas
    cx, cy = face.center
    assert abs(cx - 112) < 30 and abs(cy - 112) < 40


def test_no_face_falls_back_to_the_whole_image_and_never_pads_black(detector):
    flat = np.full((200, 160, 3), 90, np.uint8)
    flat[:, :80] = 200
    face, crop, fell_back = crop_face_input(flat, detector, FaceConfig(), 64)
    assert fell_back and face.as_list()[:4] == [0.0, 0.0, 160.0, 200.0]
    assert crop.shape == (64, 64, 3) and crop.min() >= 90  # mirrored border, no black bars
    # the geometry is serving's crop_face (same margin, same resize)
    np.testing.assert_array_equal(crop, crop_face(flat, face, 64, FaceConfig().margin))


def test_prepare_in_face_crop_mode_drops_nothing(tmp_path, detector):
    from training.prepare import prepare

    tight = _face_crop_of(astronaut(), make_detector(FaceConfig()))
    root = tmp_path / "crops"
    for i, img in enumerate([tight, tight[:, ::-1], np.full((224, 224, 3), 128, np.uint8)]):
        (root / "real").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "real" / f"{i}.png")
    sources = load_sources("folder", root)
    cfg = TrainConfig(face_crops=True, model=ModelConfig(input_size=64))
    summary = prepare(sources, tmp_path / "out", cfg, use_ray=False, progress=False)
    assert summary.crops == 3 and summary.no_face == [] and summary.fallbacks == 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["fallbacks"] == 1
    rows = [json.loads(l) for l in (tmp_path / "out" / "index.jsonl").read_text().splitlines()]
    assert sorted(r["fallback"] for r in rows) == [False, False, True]
    without = prepare(sources, tmp_path / "plain", TrainConfig(model=ModelConfig(input_size=64)),
                      use_ray=False, progress=False)
    assert without.crops == 2 and len(without.no_face) == 1  # the frame mode drops the blank
    with pytest.raises(ValueError, match="face_crops"):  # a folder keeps its mode
        prepare(sources, tmp_path / "out", TrainConfig(model=ModelConfig(input_size=64)),
                use_ray=False, progress=False)


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED / "dfdc-faces").is_dir(), reason="needs ../shared/data")
def test_dfdc_face_crops_are_found_after_padding(detector):
    rows = list(csv.DictReader((SHARED / "dfdc-faces" / "index.csv").open()))[::135][:200]
    plain = make_detector(FaceConfig())
    missed_plain = missed_padded = 0
    for r in rows:
        img = np.asarray(Image.open(SHARED / "dfdc-faces" / r["path"]).convert("RGB"))
        missed_plain += not plain.detect(img)
        missed_padded += locate_face(img, detector)[1]
    assert missed_padded < 0.05 * len(rows) < missed_plain  # measured: ~2 % vs ~23 %


# ----------------------------------------------------------------------------- augmentation
def _face(size: int = 96) -> np.ndarray:
    return np.asarray(Image.fromarray(astronaut()[0:220, 140:330]).resize((size, size)))


def test_each_transform_keeps_shape_and_changes_the_crop():
    img, rng = _face(), np.random.default_rng(0)
    outs = {"noise": A.gaussian_noise(img, 10, rng), "impulse": A.salt_pepper(img, 0.02, rng),
            "blur": A.gaussian_blur(img, 1.5), "jpeg": A.jpeg(img, 30), "rescale": A.rescale(img, 0.4),
            "h264": A.h264(img, 40), "shift": A.shift_scale(img, rng), "colour": A.colour(img, rng)}
    for name, out in outs.items():
        assert out.shape == img.shape and out.dtype == np.uint8, name
        assert np.abs(out.astype(int) - img).mean() > 0.5, name
    hit = (outs["impulse"] != img).any(-1)
    assert 0.01 < hit.mean() < 0.03 and set(np.unique(outs["impulse"][hit])) <= {0, 255}
    assert np.abs(outs["h264"].astype(int) - img).mean() < 12  # a codec, not noise


def test_augment_is_reproducible_and_off_means_identity():
    img = _face()
    a = A.augment(img, np.random.default_rng(3))
    np.testing.assert_array_equal(a, A.augment(img, np.random.default_rng(3)))
    off = AugmentConfig(**{k: 0.0 for k in AugmentConfig.model_fields})
    np.testing.assert_array_equal(A.augment(img, np.random.default_rng(3), off), img)
    always = AugmentConfig(**{k: 1.0 for k in AugmentConfig.model_fields})
    assert A.augment(img, np.random.default_rng(3), always).shape == img.shape


# ----------------------------------------------------------------------------- datasets
def test_csv_groups_and_dev_split(tmp_path):
    for i in range(200):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.jpg")
    (tmp_path / "photos").mkdir()
    for i in range(200):
        Image.new("RGB", (8, 8)).save(tmp_path / "photos" / f"p{i}.jpg")
    with (tmp_path / "index.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split", "group"])
        for i in range(160):  # 40 source videos, 4 files each (1 real, 3 fakes)
            w.writerow([f"{i}.jpg", "real" if i % 4 == 0 else "fake", "train", f"src{i // 4}"])
        for i in range(160, 200):
            w.writerow([f"{i}.jpg", "fake", "val", "v"])
    plain = load_sources("csv", tmp_path / "index.csv", name="faces")
    assert {s.split for s in plain} == {"train", "val"} and {s.dataset for s in plain} == {"faces"}
    dev = load_sources("csv", tmp_path / "index.csv", dev_fraction=0.25)
    split_of = {s.id: s.split for s in dev}
    assert all(split_of[str(i)] == "test" for i in range(160, 200))  # the published val is held out
    carved = {i // 4 for i in range(160) if split_of[str(i)] == "val"}
    assert 3 <= len(carved) <= 20
    for g in range(40):  # a source video never straddles train and dev
        assert len({split_of[str(i)] for i in range(4 * g, 4 * g + 4)}) == 1
    with pytest.raises(ValueError, match="dev_fraction"):
        load_sources("csv", tmp_path / "index.csv", dev_fraction=1.5)
    photos = load_sources("images", tmp_path / "photos", val_fraction=0.0, test_fraction=0.5,
                          name="photos")
    assert {s.split for s in photos} == {"train", "test"}
    both = combine([dev, photos])
    assert len(both) == 200 + 200 and {s.dataset for s in both} == {"csv", "photos"}
    with pytest.raises(Exception, match="duplicate"):
        combine([dev, dev])


# ----------------------------------------------------------------------------- schedule, stopping
def test_warmup_cosine_schedule_and_frozen_stages():
    import torch

    from pel_model.pel import PEL
    from training.finetune import freeze_leading_stages, keep_frozen_in_eval, lr_factor

    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(99, 100, 10, "cosine") < 0.01 and lr_factor(500, 100, 0, "constant") == 1.0
    assert lr_factor(20, 100, 10, "cosine", time_fraction=0.5) == pytest.approx(0.5)  # budget ahead
    assert lr_factor(20, 100, 10, "cosine", time_fraction=1.0) == pytest.approx(0.0)
    model = PEL(ModelConfig(backbone="efficientnet_b0", input_size=64, pretrained=False),
                load_pretrained=False)
    frozen = freeze_leading_stages(model, 2)
    assert not any(p.requires_grad for p in model.rgb.blocks[1].parameters())
    assert all(p.requires_grad for p in model.rgb.blocks[2].parameters())
    assert all(p.requires_grad for p in model.noise_rgb.parameters())  # PEL's own modules train
    model.train()
    keep_frozen_in_eval(frozen)
    assert not model.freq.bn1.training and model.freq.blocks[2].training
    before = model.rgb.blocks[0][0].bn1.running_mean.clone()
    model(torch.randint(0, 255, (4, 64, 64, 3), dtype=torch.uint8)).sum().backward()
    torch.testing.assert_close(model.rgb.blocks[0][0].bn1.running_mean, before)
    with pytest.raises(ValueError, match="stages"):
        freeze_leading_stages(model, 9)


def test_init_checkpoint_copies_every_tensor_and_refuses_another_network(tmp_path):
    import torch

    from pel_model.checkpoint import CheckpointError, CheckpointMeta, save_checkpoint
    from pel_model.pel import PEL
    from training.finetune import check_init_checkpoint, init_from_checkpoint

    cfg = ModelConfig(backbone="efficientnet_b0", input_size=64, pretrained=False)
    torch.manual_seed(1)
    trained = PEL(cfg, load_pretrained=False)
    with torch.no_grad():
        trained.rgb.bn1.running_mean.add_(0.5)  # BatchNorm statistics travel too
    path = save_checkpoint(tmp_path / "t.safetensors", trained, CheckpointMeta(model=cfg, trained=True))
    torch.manual_seed(2)
    fresh = PEL(cfg.model_copy(update={"pretrained": True}), load_pretrained=False)
    source = init_from_checkpoint(fresh, path)
    assert source.startswith(f"checkpoint {path} (sha256 ") and source.endswith("trained)")
    for (k, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(CheckpointError, match="dct_channels"):
        check_init_checkpoint(cfg.model_copy(update={"dct_channels": 32}), path)
    with pytest.raises(CheckpointError, match="input_size"):
        check_init_checkpoint(cfg.model_copy(update={"input_size": 96}), path)
    check_init_checkpoint(cfg.model_copy(update={"input_median": True}), path)  # no weights of its own
    assert TrainConfig(init_checkpoint=path).init_checkpoint == path


def test_early_stopping_and_time_budget():
    from training.train import should_stop

    cfg = TrainConfig(early_stopping_patience=2)
    hist = [{"val_auc": a} for a in (0.6, 0.7, 0.69)]
    assert should_stop(hist, cfg) is None
    assert "no val AUC gain" in should_stop(hist + [{"val_auc": 0.68}], cfg)
    assert should_stop([{"val_auc": 0.6, "stopped": "time budget"}], TrainConfig()) == "time budget"


def test_calibration_warns_when_scores_are_squeezed():
    from training.calibrate import squashed_scores_warning

    rng = np.random.default_rng(0)
    assert squashed_scores_warning(rng.uniform(0.05, 0.95, 500), 1.3) == []
    assert "narrow band" in squashed_scores_warning(rng.uniform(0.45, 0.55, 500), 1.3)[0]
    assert squashed_scores_warning(rng.uniform(0.05, 0.95, 500), 8.0)


def test_progress_lines_without_a_terminal(capsys):
    from training.progress import Progress

    p = Progress(total=10, done=2, every=4, label="run", tty=False)  # a resumed run
    for _ in range(4):
        p.step(0.5, 32)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run step 4/10 loss 0.5000 ")
    assert "crops/s eta " in lines[0]
    assert p.done == 6 and p.seen == 128


# ----------------------------------------------------------------------------- recipes, CLI
RECIPES = Path(__file__).resolve().parents[1] / "training" / "recipes"


@pytest.mark.parametrize("name", ["cpu-lite0-224", "cpu-lite0-224-stage2", "cpu-lite0-224-stage3",
                                  "cpu-lite0-224-stage4-median", "cpu-lite0-224-stage5-noise",
                                  "cpu-lite0-224-stage6-unfrozen", "gpu-lite2-320"])
def test_recipes_validate_and_name_backbones_with_offline_weights(name):
    from pel_model.weights import PACKAGED
    from training.cli import load_train_config

    cfg = load_train_config(str(RECIPES / f"{name}.yaml"))
    assert cfg.model.backbone in PACKAGED and cfg.face_crops and cfg.self_blended == "mix"
    assert {s.name for s in cfg.sources} == {"dfdc-faces", "faces-real"}
    if name.startswith("cpu"):
        assert cfg.max_minutes and cfg.max_minutes <= 120 and not cfg.use_gpu
    if name.endswith("stage2"):  # goes on from stage 1's best, on the same prepared data
        first = load_train_config(str(RECIPES / "cpu-lite0-224.yaml"))
        assert cfg.init_checkpoint == first.storage_path / first.run_name / "best.safetensors"
        assert cfg.sources == first.sources and cfg.model == first.model and cfg.seed != first.seed
    if name.endswith("median"):  # the stage-1 network with the prefilter, on the same data
        first = load_train_config(str(RECIPES / "cpu-lite0-224.yaml"))
        assert cfg.model.input_median and not first.model.input_median
        assert cfg.model.model_copy(update={"input_median": False}) == first.model
        third = load_train_config(str(RECIPES / "cpu-lite0-224-stage3.yaml"))
        assert cfg.init_checkpoint == third.storage_path / third.run_name / "best.safetensors"
        assert cfg.sources == first.sources and cfg.seed not in (first.seed, third.seed)
    if name.endswith("noise"):  # stage 4's network and data, more Gaussian noise
        fourth = load_train_config(str(RECIPES / "cpu-lite0-224-stage4-median.yaml"))
        assert cfg.model == fourth.model and cfg.sources == fourth.sources
        assert cfg.init_checkpoint == fourth.storage_path / fourth.run_name / "best.safetensors"
        assert cfg.augmentation.gaussian_noise > fourth.augmentation.gaussian_noise
        assert cfg.seed != fourth.seed
    if name.endswith("unfrozen"):  # stage 5's network, data and augmentation, one stage fewer frozen
        fifth = load_train_config(str(RECIPES / "cpu-lite0-224-stage5-noise.yaml"))
        assert cfg.model == fifth.model and cfg.sources == fifth.sources
        assert cfg.augmentation == fifth.augmentation and cfg.seed != fifth.seed
        assert cfg.init_checkpoint == fifth.storage_path / fifth.run_name / "best.safetensors"
        assert cfg.frozen_stages == fifth.frozen_stages - 1


def test_prepare_from_a_config_with_several_sources(tmp_path, capsys):
    from pel_model.cli import main

    crops, photos = tmp_path / "crops", tmp_path / "photos"
    for d in (crops / "real", crops / "fake", photos):
        d.mkdir(parents=True)
    face = _face(96)
    for i in range(4):
        Image.fromarray(face).save(crops / "real" / f"r{i}.png")
        Image.fromarray(face[:, ::-1]).save(crops / "fake" / f"f{i}.png")
        Image.fromarray(np.full((96, 96, 3), 60 * i, np.uint8)).save(photos / f"p{i}.png")
    with (crops / "index.csv").open("w") as f:
        f.write("path,label,split,group\n")
        for i in range(4):
            split = "val" if i == 3 else "train"
            f.write(f"real/r{i}.png,real,{split},v{i}\nfake/f{i}.png,fake,{split},v{i}\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
sources:
  - {{dataset: csv, root: {crops / 'index.csv'}, name: crops}}
  - {{dataset: images, root: {photos}, name: photos, options: {{val_fraction: 0.0, test_fraction: 0.5}}}}
face_crops: true
model: {{input_size: 64}}
""")
    assert main(["prepare", "--config", str(recipe), "--out", str(tmp_path / "out"), "--no-ray"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["crops"] == 12 and summary["no_face"] == [] and summary["fallbacks"] >= 4
    rows = [json.loads(l) for l in (tmp_path / "out" / "index.jsonl").read_text().splitlines()]
    assert {r["dataset"] for r in rows} == {"crops", "photos"}
    assert {r["group"] for r in rows if r["dataset"] == "crops"} == {"v0", "v1", "v2", "v3"}
    assert all(r["group"] == r["video"] for r in rows if r["dataset"] == "photos")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["dataset"] == "crops+photos" and manifest["face_crops"] is True


def test_evaluate_the_untrained_baseline_with_per_item_scores_and_per_dataset_figures(tmp_path):
    from model_utils import face_batch
    from training.evaluate import evaluate

    rows = []
    (tmp_path / "crops").mkdir()
    for i, crop in enumerate(face_batch(12, 64, seed=3)):
        label, dataset = (i % 2, "dfdc") if i < 8 else (0, "photos")
        path = f"crops/{i}.png"
        Image.fromarray(crop).save(tmp_path / path)
        rows.append({"video": f"v{i // 2}", "frame": i % 2, "label": label if i < 8 else 0,
                     "split": "test", "dataset": dataset, "path": path})
    for r in rows[:8]:  # a video's frames share a label
        r["label"] = int(r["video"][1:]) % 2
    (tmp_path / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "manifest.json").write_text(json.dumps({"size": 64, "dataset": "dfdc+photos"}))
    cfg = ModelConfig(backbone="efficientnet_b0", input_size=64, pretrained=False)
    report = evaluate(None, tmp_path, tmp_path / "eval", "test", {"downscale": 0.5},
                      batch_size=8, model_cfg=cfg)
    assert report["checkpoint"] == "untrained" and report["trained"] is False
    assert set(report["by_dataset"]) == {"dfdc", "photos"}
    assert report["by_dataset"]["photos"]["n_real"] == 4 and "auc" not in report["by_dataset"]["photos"]
    assert "fpr" in report["by_dataset"]["photos"] and "auc" in report["by_dataset"]["dfdc"]
    assert all(0 <= d["ece"] <= 1 for d in report["by_dataset"].values())
    assert 0 <= report["ece"] <= 1 and "downscale" in report["robustness"]
    with open(report["scores_csv"]) as f:
        scored = list(csv.DictReader(f))
    assert len(scored) == 12 and {r["verdict"] for r in scored} <= {"real", "fake"}
    assert all(0 <= float(r["fake_probability_downscale"]) <= 1 for r in scored)
    conf = report["confidence"]  # no `group` in these rows: videos are resampled
    assert conf["unit"] == "video" and conf["all"]["clusters"] == 6
    lo, hi = conf["by_dataset"]["dfdc"]["clean"]["auc"]
    assert lo <= report["by_dataset"]["dfdc"]["auc"] <= hi and "photos" not in conf["by_dataset"]
    d_lo, d_hi = conf["all"]["downscale"]["delta_auc"]
    assert d_lo <= report["robustness"]["downscale"]["delta"]["frame"]["auc"] <= d_hi
    from training.metrics import expected_calibration_error  # 8 real, 4 fake, weighted to 50/50
    assert report["ece_at_prior"]["prior"] == 0.5 and report["ece_at_prior"]["ece"] == pytest.approx(
        expected_calibration_error([r["label"] == "fake" for r in scored],
                                   [float(r["fake_probability"]) for r in scored], prior=0.5), abs=1e-5)
    with open(report["videos_csv"]) as f:
        videos = list(csv.DictReader(f))
    assert len(videos) == 6 and all(v["frames"] == "2" for v in videos)
    # the input median prefilter switched on for one evaluation (same weights, same seed)
    median = evaluate(None, tmp_path, tmp_path / "eval-median", "test", {}, batch_size=8,
                      model_cfg=cfg, input_median=True)
    assert report["input_median"] is False and median["input_median"] is True
    with open(median["scores_csv"]) as f:
        filtered = [float(r["fake_probability"]) for r in csv.DictReader(f)]
    assert filtered != [float(r["fake_probability"]) for r in scored]


def test_calibrate_cli_fits_platt_for_a_balanced_prior_by_default_and_temperature_on_request(
        tmp_path, capsys):
    """`pel calibrate` writes T, b and the prior into the checkpoint; `--method temperature
    --prior split` is plain temperature scaling on the split as it is (b = 0)."""
    from model_utils import face_batch, small_model
    from pel_model.checkpoint import CheckpointMeta, read_meta, save_checkpoint
    from pel_model.cli import main
    from training.calibrate import calibration_prior

    cfg = ModelConfig(backbone="efficientnet_b0", input_size=64, pretrained=False)
    (tmp_path / "crops").mkdir()
    rows = []
    for i, crop in enumerate(face_batch(24, 64, seed=5)):
        label = int(i % 3 != 0)  # two fakes per real, as a split can happen to be
        if label:
            crop = A.gaussian_blur(crop, 2.0)  # something the network's logits can follow
        Image.fromarray(crop).save(tmp_path / "crops" / f"{i}.png")
        rows.append({"video": f"v{i}", "frame": 0, "label": label, "split": "val",
                     "dataset": "d", "path": f"crops/{i}.png"})
    (tmp_path / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "manifest.json").write_text(json.dumps({"size": 64, "dataset": "d"}))
    ckpt = save_checkpoint(tmp_path / "m.safetensors", small_model(cfg=cfg),
                           CheckpointMeta(model=cfg, trained=True))

    out = {}
    for name, flags in (("platt", []), ("temperature", ["--method", "temperature", "--prior", "split"])):
        dest = tmp_path / f"{name}.safetensors"
        assert main(["calibrate", str(ckpt), "--data", str(tmp_path), "--target-fpr", "0.125",
                     "-o", str(dest), *flags]) == 0
        out[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        meta = read_meta(dest)
        assert meta.calibrated and meta.temperature == pytest.approx(out[name]["temperature"])
        assert meta.logit_bias == pytest.approx(out[name]["logit_bias"])
        assert meta.provenance["calibration"]["method"] == name
    assert out["platt"]["prior"] == 0.5 and out["platt"]["ece_at_prior"]["prior"] == 0.5
    assert out["platt"]["logit_bias"] != 0.0
    assert out["temperature"]["prior"] is None and out["temperature"]["logit_bias"] == 0.0
    assert out["temperature"]["ece_at_prior"] is None
    # evaluate's ece_at_prior: the stated prior, else the calibration split's share of fakes
    cal = read_meta(tmp_path / "temperature.safetensors").provenance["calibration"]
    assert calibration_prior(read_meta(tmp_path / "temperature.safetensors")) == pytest.approx(
        1 - cal["n_real"] / cal["n"]) and cal["n_real"] < cal["n"]
    assert calibration_prior(read_meta(tmp_path / "platt.safetensors")) == 0.5
    assert calibration_prior(CheckpointMeta()) == 0.5
    with pytest.raises(SystemExit):
        main(["calibrate", str(ckpt), "--data", str(tmp_path), "--method", "isotonic"])
    capsys.readouterr()
    # A prior must lie in (0, 1): validated with the config, a clear error, nothing written.
    assert main(["calibrate", str(ckpt), "--data", str(tmp_path), "--prior", "1.5"]) != 0
    assert "calibration_prior" in capsys.readouterr().err
