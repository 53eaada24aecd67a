"""`pel train`: the paper's recipe on Ray Train (V2).

Each worker builds the PEL network, draws balanced batches (`data.BalancedBatches`; the global
batch `batch_size` is split evenly over workers), trains with Adam and BCE-with-logits (mixed
precision on GPU) and validates every epoch on its shard of the `val` split (results gathered
over workers): loss, accuracy at 0.5, AUC, EER. Rank 0 writes a Ray checkpoint per epoch holding
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

import numpy as np
import torch

from pel_model.checkpoint import CheckpointMeta, read_meta, save_checkpoint
from pel_model.config import TrainConfig
from pel_model.pel import PEL

from .data import BalancedBatches, eval_arrays, manifest, read_index
from .metrics import binary_metrics
from .plots import training_curve
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


def validate(model: PEL, prepared: Path, rows: list[dict], cfg: TrainConfig, rank: int, world: int,
             device) -> dict:
    """Validation metrics over all workers (each scores `rows[rank::world]`)."""
    crops, labels, _ = eval_arrays(prepared, rows[rank::world], cfg.seed, cfg.faces.margin,
                                   threads=cfg.loader_threads) if rows[rank::world] else (None, None, None)
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
    model = PEL(cfg.model, load_pretrained=True)
    state, start, history = None, 0, []
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            model.load_state_dict(load_file(os.path.join(d, MODEL_FILE)))
            state = torch.load(os.path.join(d, STATE_FILE), weights_only=True)
        start, history = int(state["epoch"]) + 1, list(state.get("history", []))
        if rank == 0:
            log.info("resuming %s after epoch %d", cfg.run_name, state["epoch"])
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(model)
    net: PEL = getattr(model, "module", model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp = cfg.mixed_precision and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
    batches = BalancedBatches(prepared, train_rows, cfg.self_blended, cfg.batch_size // world,
                              cfg.seed, rank, cfg.augment, cfg.faces.margin, cfg.loader_threads)
    steps = steps_per_epoch(cfg, train_rows)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for epoch in range(start, cfg.epochs):
        t0, losses = time.time(), []
        model.train()
        for crops, labels in batches.epoch(epoch, steps):
            x = torch.from_numpy(crops).to(device)
            y = torch.from_numpy(labels).to(device)
            with torch.autocast(device.type, enabled=amp):
                loss = loss_fn(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
        metrics = {"epoch": epoch, "train_loss": float(np.mean(losses)), "steps": steps,
                   "epoch_s": time.time() - t0}
        metrics.update(validate(net, prepared, val_rows, cfg, rank, world, device))
        history.append(metrics)
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                meta = CheckpointMeta(model=cfg.model, trained=True, calibrated=False, provenance={
                    "prepared": str(prepared), "dataset": manifest(prepared).get("dataset", ""),
                    "epoch": epoch, "metrics": metrics, "history": history,
                    "self_blended": cfg.self_blended,
                    "recipe": cfg.model_dump(mode="json", exclude={"model", "faces"}),
                    "workers": world})
                save_checkpoint(os.path.join(d, MODEL_FILE), net, meta)
                torch.save({"epoch": epoch, "optimizer": opt.state_dict(), "history": history,
                            "scaler": scaler.state_dict()}, os.path.join(d, STATE_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(d)
                log.info("epoch %d: %s", epoch, {k: round(v, 4) if isinstance(v, float) else v
                                                 for k, v in metrics.items()})
            ray.train.report(metrics, checkpoint=checkpoint)


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
    storage = Path(cfg.storage_path).expanduser().resolve()
    if not ray.is_initialized():
        ray.init(address=ray_address)
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
