"""`pel train`: the paper's recipe on Ray Train (V2).

Each worker builds the PEL network (ImageNet-initialised where weights resolve, leading stages
frozen if asked: `finetune`), draws balanced batches (`data.BalancedBatches`; the global batch
`batch_size` is split evenly over workers), trains with Adam(W) and BCE-with-logits (warm-up and
cosine schedule, mixed precision on GPU), logs progress (`progress`), and validates every epoch
on its shard of the `val` split (results gathered over workers): loss, accuracy at 0.5, AUC,
EER. Training stops early when val AUC stops improving (`early_stopping_patience`) or the time
budget (`max_minutes`) is spent; the last epoch is then validated and checkpointed as usual. Rank 0 writes a Ray checkpoint per epoch holding
`model.safetensors` (the project's checkpoint format, `trained=True`, not yet calibrated) and
`train_state.pt` (epoch, optimizer, grad scaler). Re-running with the same `run_name` and
`storage_path` resumes from the latest checkpoint (Ray Train restores it for the new run).
After the run `best.safetensors` (highest validation AUC) and `last.safetensors` are copied to
`<storage_path>/<run_name>/`.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pel_model.checkpoint import CheckpointMeta, read_meta, save_checkpoint
from pel_model.config import TrainConfig
from pel_model.pel import PEL

from .data import BalancedBatches, eval_arrays, manifest, read_index
from .finetune import (check_init_checkpoint, freeze_leading_stages, init_from_checkpoint,
                       keep_frozen_in_eval, make_optimizer, set_lr)
from .metrics import binary_metrics
from .plots import training_curve
from .progress import Progress
from .scoring import predict_logits, sigmoid

log = logging.getLogger(__name__)
MODEL_FILE, STATE_FILE = "model.safetensors", "train_state.pt"


@dataclass
class TrainResult:
    best: Path  # best.safetensors (highest val AUC)
    last: Path  # last.safetensors
    metrics: dict  # the last epoch's metrics
    run_dir: Path


def steps_per_epoch(cfg: TrainConfig, rows: list[dict]) -> int:
    """`cfg.steps_per_epoch`, else one pass over the training crops in expectation (for
    self-blended-only training, twice the real crops: each also yields a blended fake)."""
    if cfg.steps_per_epoch:
        return cfg.steps_per_epoch
    n = 2 * sum(r["label"] == 0 for r in rows) if cfg.self_blended == "only" else len(rows)
    return max(1, math.ceil(n / cfg.batch_size))


def _gather(obj):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def validate(model: PEL, crops: Optional[np.ndarray], labels: Optional[np.ndarray],
             cfg: TrainConfig, device) -> dict:
    """Validation metrics over all workers (each scores its own shard of the split)."""
    local = ([], [])
    if crops is not None:
        local = (predict_logits(model, crops, cfg.eval_batch_size, device,
                                cfg.mixed_precision).tolist(), labels.tolist())
    parts = _gather(local)
    logits = np.array([x for p in parts for x in p[0]])
    y = np.array([x for p in parts for x in p[1]], np.int64)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(logits), torch.from_numpy(y.astype(np.float64))).item()
    m = binary_metrics(y, sigmoid(logits))
    return {"val_loss": loss, "val_acc": m["acc"], "val_auc": m.get("auc", float("nan")),
            "val_eer": m.get("eer", float("nan")), "val_n": m["n"]}


def _any(flag: bool) -> bool:
    """True on every worker when it is true on one (so all stop at the same step)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def should_stop(history: list[dict], cfg: TrainConfig) -> Optional[str]:
    """Why training ends after the last epoch of `history`, or None to go on."""
    if history and history[-1].get("stopped") == "time budget":
        return "time budget"
    patience = cfg.early_stopping_patience
    aucs = [h.get("val_auc", float("nan")) for h in history]
    if patience and len(aucs) > patience:
        best = int(np.nanargmax(aucs)) if not np.all(np.isnan(aucs)) else 0
        if len(aucs) - 1 - best >= patience:
            return f"no val AUC gain for {patience} epochs"
    return None


def _loop(conf: dict) -> None:
    import ray.train
    import ray.train.torch
    from safetensors.torch import load_file

    cfg = TrainConfig.model_validate(conf["cfg"])
    prepared = Path(conf["prepared"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    train_rows, val_rows = read_index(prepared, "train"), read_index(prepared, "val")
    resume = ray.train.get_checkpoint()
    model = PEL(cfg.model, load_pretrained=cfg.init_checkpoint is None)
    weights_source = model.weights_source
    if cfg.init_checkpoint is not None and resume is None:
        weights_source = init_from_checkpoint(model, cfg.init_checkpoint)
    state, start, history = None, 0, []
    if resume is not None:
        with resume.as_directory() as d:
            model.load_state_dict(load_file(os.path.join(d, MODEL_FILE)))
            state = torch.load(os.path.join(d, STATE_FILE), weights_only=True)
        start, history = int(state["epoch"]) + 1, list(state.get("history", []))
        weights_source = state.get("weights_source", weights_source)
        if rank == 0:
            print(f"resuming {cfg.run_name} after epoch {state['epoch']}", flush=True)
    frozen = freeze_leading_stages(model, cfg.frozen_stages)
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)  # ~1.2x faster CPU convolutions
    model = ray.train.torch.prepare_model(model)
    net: PEL = getattr(model, "module", model)
    steps = steps_per_epoch(cfg, train_rows)
    opt = make_optimizer(model, cfg)
    amp = cfg.mixed_precision and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
    batches = BalancedBatches(prepared, train_rows, cfg.self_blended, cfg.batch_size // world,
                              cfg.seed, rank, cfg.augmentation if cfg.augment else None,
                              cfg.faces.margin, cfg.loader_threads, cfg.sbi_fraction)
    shard = val_rows[rank::world]
    val_crops, val_labels, _ = (eval_arrays(prepared, shard, cfg.seed, cfg.faces.margin,
                                            threads=cfg.loader_threads) if shard else (None, None, None))
    spent_s = sum(h.get("epoch_s", 0.0) for h in history)  # training time of earlier attempts
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
    loss_fn = torch.nn.BCEWithLogitsLoss()
    total = cfg.epochs * steps
    step = sum(h.get("steps", 0) for h in history)
    progress = Progress(total, step, cfg.log_every_steps, cfg.run_name, enabled=rank == 0)
    if should_stop(history, cfg):
        start = cfg.epochs  # a finished run re-run: nothing left to do
    for epoch in range(start, cfg.epochs):
        t0, losses, stopped = time.time(), [], None
        model.train()
        keep_frozen_in_eval(frozen)
        for crops, labels in batches.epoch(epoch, steps):
            used = spent_s + time.time() - t0
            lr = set_lr(opt, cfg, step, total, used / budget_s if budget_s else 0.0)
            step += 1
            x = torch.from_numpy(crops).to(device)
            y = torch.from_numpy(labels).to(device)
            with torch.autocast(device.type, enabled=amp):
                loss = loss_fn(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
            progress.step(losses[-1], len(crops) * world)
            if _any(budget_s is not None and spent_s + time.time() - t0 >= budget_s):
                stopped = "time budget"
                break
        epoch_s = time.time() - t0
        spent_s += epoch_s
        metrics = {"epoch": epoch, "train_loss": float(np.mean(losses)), "steps": len(losses),
                   "epoch_s": epoch_s, "lr": lr,
                   "train_crops_s": len(losses) * cfg.batch_size / max(epoch_s, 1e-9)}
        if stopped:
            metrics["stopped"] = stopped
        t_val = time.time()
        metrics.update(validate(net, val_crops, val_labels, cfg, device))
        metrics["val_s"] = time.time() - t_val
        history.append(metrics)
        reason = should_stop(history, cfg)
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                meta = CheckpointMeta(model=net.cfg, trained=True, calibrated=False, provenance={
                    "prepared": str(prepared), "dataset": manifest(prepared).get("dataset", ""),
                    "epoch": epoch, "metrics": metrics, "history": history,
                    "self_blended": cfg.self_blended, "backbone_init": weights_source,
                    "recipe": cfg.model_dump(mode="json", exclude={"model", "faces"}),
                    "workers": world, **({"stopped": reason} if reason else {})})
                save_checkpoint(os.path.join(d, MODEL_FILE), net, meta)
                torch.save({"epoch": epoch, "optimizer": opt.state_dict(), "history": history,
                            "scaler": scaler.state_dict(),
                            "weights_source": weights_source}, os.path.join(d, STATE_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(d)
                print(f"epoch {epoch}: " + ", ".join(
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in metrics.items() if k != "epoch"), flush=True)
                if reason:
                    print(f"stopping after epoch {epoch}: {reason}", flush=True)
            ray.train.report(metrics, checkpoint=checkpoint)
        if reason:
            break
    progress.close()


def join_options(address: str | None) -> dict:
    """`ray.init` options for this job's processes: RAY_ADDRESS when joining `address`, so Ray
    Train's helper actors that look a cluster up themselves (PlacementGroupCleaner) find this
    one even when several local clusters run ("Found multiple active Ray instances"); and Ray
    Train's print patch off (it tees each progress line to stdout and to its logger: twice)."""
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if address and address != "auto":
        env["RAY_ADDRESS"] = address
    return {"runtime_env": {"env_vars": env}}


def train(prepared: Path, cfg: TrainConfig, ray_address: str | None = None) -> TrainResult:
    """Run (or resume) `cfg.run_name` under `cfg.storage_path` on the Ray cluster."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    prepared = Path(prepared).resolve()
    size = manifest(prepared)["size"]
    if size != cfg.model.input_size:
        raise ValueError(f"{prepared} holds {size}px crops but model.input_size is "
                         f"{cfg.model.input_size}: prepare again with --size {cfg.model.input_size}")
    if (cfg.batch_size // cfg.num_workers) % 2 or cfg.batch_size % cfg.num_workers:
        raise ValueError(f"batch_size {cfg.batch_size} must split into even per-worker batches "
                         f"over {cfg.num_workers} workers")
    read_index(prepared, "train"), read_index(prepared, "val")  # fail fast on empty splits
    if cfg.init_checkpoint is not None:  # workers may run elsewhere: an absolute path, checked
        init = Path(cfg.init_checkpoint).expanduser().resolve()
        check_init_checkpoint(cfg.model, init)
        cfg = cfg.model_copy(update={"init_checkpoint": init})
    storage = Path(cfg.storage_path).expanduser().resolve()
    if not ray.is_initialized():
        ray.init(address=ray_address, **join_options(ray_address))
    trainer = TorchTrainer(
        _loop,
        train_loop_config={"prepared": str(prepared), "cfg": cfg.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=cfg.run_name, storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(
                                 num_to_keep=cfg.checkpoints_to_keep,
                                 checkpoint_score_attribute="val_auc", checkpoint_score_order="max"),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {cfg.run_name} produced no checkpoint (is epochs > the epochs "
                           f"already done in {storage / cfg.run_name}?)")
    run_dir = storage / cfg.run_name
    best_ckpt = max(result.best_checkpoints, key=lambda cm: cm[1].get("val_auc", -1))[0] \
        if result.best_checkpoints else result.checkpoint
    out = {}
    for name, ckpt in (("best", best_ckpt), ("last", result.checkpoint)):
        with ckpt.as_directory() as d:
            out[name] = Path(shutil.copy(os.path.join(d, MODEL_FILE), run_dir / f"{name}.safetensors"))
    training_curve(read_meta(out["last"]).provenance.get("history", []), run_dir / "curve.png")
    return TrainResult(out["best"], out["last"], dict(result.metrics or {}), run_dir)
