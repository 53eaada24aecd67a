"""Prepared crops -> balanced training batches and evaluation arrays.

Batches are half real, half fake. Fakes come from the dataset (`self_blended="off"`), from
self-blending real crops (`"only"`: no fake data is read at all), or both (`"mix"`: a
`sbi_fraction` share self-blended in expectation). Augmentation (`training.augment`) is applied
to real and fake crops alike, so it cannot become a label cue. All randomness comes from a generator
seeded by (seed, epoch, step, worker rank): a run is reproducible and workers draw different data.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from pel_model.config import AugmentConfig

from .augment import augment
from .prepare import INDEX
from .sbi import self_blend


def read_index(prepared: Path, split: Optional[str] = None) -> list[dict]:
    """Rows of `<prepared>/index.jsonl`, optionally of one split (raises when there are none)."""
    path = Path(prepared) / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `pel prepare` first")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if split is not None:
        rows = [r for r in rows if r["split"] == split]
        if not rows:
            raise ValueError(f"{path} has no crops in split {split!r}")
    return rows


def manifest(prepared: Path) -> dict:
    return json.loads((Path(prepared) / "manifest.json").read_text())


def load_crop(prepared: Path, row: dict) -> np.ndarray:
    path = row["path"]
    if "#" in path:
        file, key = path.split("#", 1)
        with np.load(Path(prepared) / file) as z:
            return np.ascontiguousarray(z[key])
    with Image.open(Path(prepared) / path) as img:
        return np.ascontiguousarray(np.asarray(img.convert("RGB")))


def load_crops(prepared: Path, rows: list[dict], threads: int = 2) -> np.ndarray:
    with ThreadPoolExecutor(threads) as pool:
        return np.stack(list(pool.map(lambda r: load_crop(prepared, r), rows)))


def sbi_fake(crop: np.ndarray, row: dict, rng: np.random.Generator, margin: float) -> np.ndarray:
    return self_blend(crop, rng, row.get("landmarks"), margin).image


class BalancedBatches:
    """Endless source of (uint8 crops (B, S, S, 3), float labels (B,)) with B/2 real, B/2 fake."""

    def __init__(self, prepared: Path, rows: list[dict], mode: str, batch_size: int, seed: int,
                 rank: int = 0, augmentation: Optional[AugmentConfig] = AugmentConfig(),
                 margin: float = 0.3, threads: int = 2, sbi_fraction: float = 0.5):
        if batch_size % 2:
            raise ValueError("batch size must be even")
        self.prepared, self.mode, self.batch = Path(prepared), mode, batch_size
        self.seed, self.rank, self.augmentation = seed, rank, augmentation
        self.margin, self.threads, self.sbi_fraction = margin, threads, sbi_fraction
        self.real = [r for r in rows if r["label"] == 0]
        self.fake = [r for r in rows if r["label"] == 1]
        if not self.real:
            raise ValueError("training split has no real crops")
        if mode in ("off", "mix") and not self.fake:
            raise ValueError(f"self_blended={mode!r} needs fake crops in the training split; "
                             "use self_blended='only' to train on real faces alone")

    def epoch(self, epoch: int, steps: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for step in range(steps):
            yield self.make(np.random.default_rng([self.seed, epoch, step, self.rank]))

    def make(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        half = self.batch // 2
        real_rows = [self.real[i] for i in rng.integers(0, len(self.real), half)]
        n_sbi = {"off": 0, "only": half, "mix": int(rng.binomial(half, self.sbi_fraction))}[self.mode]
        fake_rows = [self.fake[i] for i in rng.integers(0, len(self.fake), half - n_sbi)] if n_sbi < half else []
        sbi_rows = [self.real[i] for i in rng.integers(0, len(self.real), n_sbi)]
        crops = load_crops(self.prepared, real_rows + fake_rows + sbi_rows, self.threads)
        fakes = [sbi_fake(c, r, rng, self.margin) for c, r in zip(crops[2 * half - n_sbi:], sbi_rows)]
        if fakes:
            crops[2 * half - n_sbi:] = np.stack(fakes)
        if self.augmentation is not None:
            crops = np.stack([augment(c, rng, self.augmentation) for c in crops])
        labels = np.r_[np.zeros(half), np.ones(half)].astype(np.float32)
        return crops, labels


def eval_arrays(prepared: Path, rows: list[dict], seed: int, margin: float = 0.3,
                synthesize_fakes: bool = True, threads: int = 2
                ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(crops, labels, video ids) of an evaluation split. When the split holds no fakes (real
    faces only) and `synthesize_fakes`, each real crop gets a self-blended twin (fixed seed), with
    video id `<id>#sbi`, so validation AUC is still defined."""
    crops = load_crops(prepared, rows, threads)
    labels = np.array([r["label"] for r in rows], np.int64)
    videos = [r["video"] for r in rows]
    if synthesize_fakes and not labels.any():
        rng = np.random.default_rng([seed, 7919])
        fakes = np.stack([sbi_fake(c, r, rng, margin) for c, r in zip(crops, rows)])
        crops = np.concatenate([crops, fakes])
        labels = np.r_[labels, np.ones(len(fakes), np.int64)]
        videos = videos + [v + "#sbi" for v in videos]
    return crops, labels, videos


def calibration_crops(prepared: Path, split: str = "val", limit: int = 256, seed: int = 0
                      ) -> np.ndarray:
    """INT8 calibration crops of a prepared split: half real, half fake where the split allows
    (ranges calibrated on real faces only can clip the activations that flag a fake). A split of
    real faces only (self-blended training) gets self-blended fakes, as in validation."""
    rows = read_index(prepared, split)
    rng = np.random.default_rng(seed)
    real = [r for r in rows if r["label"] == 0]
    fake = [r for r in rows if r["label"] == 1]
    if not real:
        raise ValueError(f"split {split!r} of {prepared} has no real crops: INT8 calibration "
                         "needs both classes")

    def take(group: list[dict], n: int) -> list[dict]:
        return [group[i] for i in sorted(rng.choice(len(group), n, replace=False))]

    if not fake:  # eval_arrays adds one self-blended twin per real crop
        pick = take(real, min(len(real), limit // 2))
        return eval_arrays(prepared, pick, seed, synthesize_fakes=True)[0]
    n_real = min(len(real), max(limit // 2, limit - len(fake)))
    return load_crops(prepared, take(real, n_real) + take(fake, min(len(fake), limit - n_real)))
