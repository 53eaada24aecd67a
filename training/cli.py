"""`pel prepare`, `pel train`, `pel average`, `pel calibrate`, `pel evaluate`.

All take `--config FILE.yaml` (a `TrainConfig` mapping, validated by pydantic) and flags that
override single fields; the merged config is validated again, so a bad value is a clear error.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from pel_model.config import TrainConfig


def load_train_config(path: str | None, **overrides: Any) -> TrainConfig:
    """TrainConfig from an optional YAML file plus overrides: `model.input_size=128` style keys
    given as `{"model": {"input_size": 128}}`, None values ignored."""
    data: dict = {}
    if path:
        import yaml

        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of TrainConfig fields")
        data = data.get("train", data)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict):
            section = dict(data.get(key) or {})
            section.update({k: v for k, v in value.items() if v is not None})
            data[key] = section
        else:
            data[key] = value
    return TrainConfig.model_validate(data)


def _model_overrides(args) -> dict:
    d = {"backbone": args.backbone, "input_size": args.size}
    if getattr(args, "no_pretrained", False):
        d["pretrained"] = False
    return d


def _sources(cfg: TrainConfig, args) -> tuple[list, str]:
    """The sources to prepare: `--dataset/--root` (one dataset, CLI options) or the config's
    `sources` list; and the manifest's dataset name."""
    from .datasets import combine, load_sources

    if args.dataset or args.root:
        if not (args.dataset and args.root):
            raise ValueError("--dataset and --root go together (or list `sources` in --config)")
        options: dict[str, Any] = {}
        if args.dataset in ("ffpp", "dfd") and args.compression:
            options["compression"] = args.compression
        if args.dataset == "ffpp" and args.methods:
            options["methods"] = args.methods.split(",")
        if args.dataset == "ffpp" and args.splits:
            options["splits_dir"] = Path(args.splits)
        if args.val_fraction is not None:
            options["val_fraction"] = args.val_fraction
        if args.dev_fraction is not None:
            if args.dataset != "csv":
                raise ValueError("--dev-fraction applies to --dataset csv")
            options["dev_fraction"] = args.dev_fraction
        return load_sources(args.dataset, Path(args.root), **options), args.dataset
    if not cfg.sources:
        raise ValueError("give --dataset and --root, or a --config with a `sources` list")
    parts = [load_sources(s.dataset, s.root, s.name, **s.options) for s in cfg.sources]
    return combine(parts), "+".join(s.name or s.dataset for s in cfg.sources)


def _prepare(args) -> int:
    from .prepare import prepare, summary_json

    cfg = load_train_config(args.config, frames_per_video=args.frames, crop_format=args.format,
                            face_crops=True if args.face_crops else None,
                            model=_model_overrides(args))
    sources, dataset = _sources(cfg, args)
    use_ray = not args.no_ray
    if use_ray:
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        from .train import join_options

        if not ray.is_initialized():
            ray.init(address=args.address, **join_options(args.address))
    summary = prepare(sources, Path(args.out), cfg, use_ray=use_ray, dataset=dataset,
                      allow_failures=args.allow_failures)
    print(summary_json(summary))
    return 0


def _train(args) -> int:
    from .train import train

    cfg = load_train_config(
        args.config, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        num_workers=args.workers, use_gpu=True if args.gpu else None,
        steps_per_epoch=args.steps_per_epoch, self_blended=args.self_blended, seed=args.seed,
        run_name=args.name, storage_path=args.storage, init_checkpoint=args.init_checkpoint,
        model=_model_overrides(args))
    result = train(Path(args.data), cfg, ray_address=args.address)
    print(json.dumps({"best": str(result.best), "last": str(result.last),
                      "run_dir": str(result.run_dir), "metrics": result.metrics}))
    return 0


def _average(args) -> int:
    from .weight_average import average_checkpoints

    path, meta = average_checkpoints(args.checkpoints, args.output)
    print(json.dumps({"checkpoint": str(path), "averaged": len(args.checkpoints),
                      "backbone": meta.model.backbone, "input_size": meta.model.input_size}))
    return 0


def _calibrate(args) -> int:
    from .calibrate import calibrate

    split_prior = args.prior == "split"
    cfg = load_train_config(args.config, target_fpr=args.target_fpr, calibration=args.method,
                            calibration_prior=None if split_prior or args.prior is None
                            else float(args.prior))
    if split_prior:
        cfg = cfg.model_copy(update={"calibration_prior": None})
    r = calibrate(Path(args.checkpoint), Path(args.data), args.split, cfg.target_fpr,
                  Path(args.output) if args.output else None, cfg.eval_batch_size, cfg.seed,
                  args.device, cfg.calibration, cfg.calibration_prior)
    print(json.dumps({"checkpoint": str(r.checkpoint), "method": r.method, "prior": r.prior,
                      "temperature": r.temperature, "logit_bias": r.logit_bias,
                      "threshold": r.threshold, "target_fpr": r.target_fpr,
                      "ece_before": r.ece_before, "ece_after": r.ece_after,
                      "ece_at_prior": r.ece_at_prior,
                      "reliability_png": str(r.diagram), "metrics": r.metrics,
                      "warnings": r.warnings}))
    return 0


def _evaluate(args) -> int:
    from .evaluate import evaluate, parse_perturbations

    cfg = load_train_config(args.config, model=_model_overrides(args))
    untrained = args.checkpoint == "untrained"
    out = Path(args.out or ("untrained-eval" if untrained else
                            Path(args.checkpoint).with_suffix("").as_posix() + "-eval"))
    report = evaluate(None if untrained else Path(args.checkpoint), Path(args.data), out, args.split,
                      parse_perturbations(args.robustness), cfg.eval_batch_size, cfg.seed, args.device,
                      int8_calibration=args.int8_calibration, int8_keep_float=args.int8_keep_float,
                      model_cfg=cfg.model, input_median=args.input_median,
                      bootstrap=args.bootstrap)
    print(json.dumps({"report": str(out / "report.json"), "clean": report["clean"],
                      "by_dataset": report["by_dataset"], "scores_csv": report["scores_csv"],
                      "robustness_delta": {k: v["delta"] for k, v in report["robustness"].items()},
                      **({"confidence": report["confidence"]} if "confidence" in report else {}),
                      **({"int8": report["int8"]} if "int8" in report else {})}))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with TrainConfig fields")


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", help="timm EfficientNet name (default efficientnet_b4)")
    p.add_argument("--size", type=int, help="crop / model input size (320 FF++, 224 WildDeepfake)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    from .datasets import ADAPTERS

    p = sub.add_parser("prepare", help="sample frames, crop faces and cache them with an index")
    _common(p)
    _model_flags(p)
    p.add_argument("--dataset", choices=sorted(ADAPTERS),
                   help="dataset adapter (or list several under `sources` in --config)")
    p.add_argument("--root", help="dataset folder (CSV file for --dataset csv)")
    p.add_argument("--out", required=True, help="output folder (re-running resumes)")
    p.add_argument("--frames", type=int, help="frames sampled per video (default 50)")
    p.add_argument("--format", choices=["png", "jpg", "npz"])
    p.add_argument("--compression", help="FF++/DFD: c23 (HQ), c40 (LQ) or raw")
    p.add_argument("--methods", help="FF++ manipulation methods, comma separated (default all four)")
    p.add_argument("--splits", help="FF++ folder with train/val/test.json (default <root>/splits)")
    p.add_argument("--val-fraction", type=float, help="for datasets without a validation split")
    p.add_argument("--dev-fraction", type=float,
                   help="csv: carve val out of train by group, the CSV's own val becomes test")
    p.add_argument("--face-crops", action="store_true",
                   help="inputs already are face crops: pad before detection, fall back to the "
                        "whole image as the face (no input dropped)")
    p.add_argument("--no-ray", action="store_true", help="run in this process instead of Ray tasks")
    p.add_argument("--address", help="Ray cluster address (default: start or join a local one)")
    p.add_argument("--allow-failures", action="store_true",
                   help="report unreadable videos instead of failing")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("train", help="train PEL with Ray Train (re-run the same --name to resume)")
    _common(p)
    _model_flags(p)
    p.add_argument("--data", required=True, help="folder written by `pel prepare`")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--workers", type=int, help="Ray Train workers")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--steps-per-epoch", type=int)
    p.add_argument("--self-blended", choices=["off", "mix", "only"])
    p.add_argument("--seed", type=int)
    p.add_argument("--name", help="run name (default pel)")
    p.add_argument("--storage", help="run storage folder (default ./runs)")
    p.add_argument("--no-pretrained", action="store_true", help="random backbone initialisation")
    p.add_argument("--init-checkpoint", help="start from this trained checkpoint (fine-tuning)")
    p.add_argument("--address", help="Ray cluster address")
    p.set_defaults(func=_train)

    p = sub.add_parser("average",
                       help="uniform weight average (SWA) of checkpoints of one network")
    p.add_argument("checkpoints", nargs="+", help="two or more checkpoints, same architecture")
    p.add_argument("-o", "--output", required=True, help="averaged (uncalibrated) checkpoint")
    p.set_defaults(func=_average)

    p = sub.add_parser("calibrate", help="fit the probability map and threshold into a checkpoint")
    _common(p)
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="prepared folder")
    p.add_argument("--split", default="val")
    p.add_argument("--target-fpr", type=float, help="false-positive rate on real faces (default 0.01)")
    p.add_argument("--method", choices=["platt", "temperature"],
                   help="sigmoid(z / T + b) or sigmoid(z / T) (default: the config's, platt)")
    p.add_argument("--prior", help="share of fakes the probabilities refer to, e.g. 0.5 or 0.01, "
                                   "or 'split' for the split's own share (default: the config's, 0.5)")
    p.add_argument("-o", "--output", help="calibrated checkpoint (default <name>.calibrated.safetensors)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("evaluate", help="Acc/AUC/EER at frame and video level, robustness")
    _common(p)
    _model_flags(p)
    p.add_argument("checkpoint", help="checkpoint file, or `untrained` for the network the service "
                                      "runs without one (a chance baseline; --backbone/--size)")
    p.add_argument("--data", required=True, help="prepared folder (any dataset: cross-dataset)")
    p.add_argument("--split", default="test")
    p.add_argument("--robustness", default="all",
                   help="'all', 'none' or e.g. 'jpeg:70,gaussian_blur:2' (default all)")
    p.add_argument("--out", help="report folder (default <checkpoint>-eval)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--int8-calibration", type=Path, metavar="DIR",
                   help="also measure what INT8 costs: quantise with crops from DIR (a prepared "
                        "folder, its val split, or face images) and compare with FP32 on --split")
    p.add_argument("--int8-keep-float", nargs="+", default=(), metavar="PREFIX",
                   help="with --int8-calibration: weight-name prefixes of layers kept in float")
    p.add_argument("--input-median", action=argparse.BooleanOptionalAction, default=None,
                   help="switch the input median prefilter on (or off with --no-input-median) "
                        "whatever the checkpoint says (default: as the checkpoint says)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="resamples of source videos for 95%% intervals of each AUC and paired "
                        "delta AUC (default 1000; 0: none)")
    p.set_defaults(func=_evaluate)
