"""Verdicts of real video files through the service's own path (`workers.pipeline.run_job`:
PyAV decode, sampling, CenterFace, the training crop, the detector's calibrated scores, the clip
rule), in this process, without Ray or Redis: what `serve run` would answer, for a folder of
clips with a `labels.csv` (`file,label`, as in ../shared/data/videos).

    python -m bench.clip_verdicts ../shared/data/videos --out /tmp/clips.json [--checkpoint CKPT]

Reported, not tuned: a handful of clips says little about detection quality.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self, timeout_s=None):
        return self.value


def clip_verdicts(folder: Path, checkpoint: Path | None = None, sample_fps: float = 2.0,
                  clip_seconds: float = 10.0) -> list[dict]:
    from pel_model.config import AppConfig, DEFAULT_CHECKPOINT
    from pel_model.faces import make_detector
    from pel_model.scorer import load_scorer
    from workers.jobs import Job
    from workers.pipeline import Hooks, ModelInfo, run_job

    labels = {}
    if (folder / "labels.csv").is_file():
        with (folder / "labels.csv").open() as f:
            labels = {r["file"]: r["label"] for r in csv.DictReader(f)}
    cfg = AppConfig.model_validate({
        "urls": {"allow_files": True, "file_roots": [str(folder.resolve())]},
        "stream": {"sample_fps": sample_fps, "clip_seconds": clip_seconds},
        "detector": {"checkpoint": str(checkpoint or DEFAULT_CHECKPOINT)}})
    scorer = load_scorer(cfg.detector, device="cpu")
    info = ModelInfo(scorer.input_size, scorer.threshold, scorer.model_id, scorer.warnings,
                     scorer.meta.trained)
    faces = make_detector(cfg.faces)
    out = []
    for path in sorted(folder.glob("*.mp4")):
        verdicts: list[dict] = []
        run_job(Job(path.stem, str(path.resolve())), cfg, faces, info,
                lambda crops: _Done(scorer.probabilities(crops)),
                Hooks(on_verdict=lambda v, _t: verdicts.append(v)))
        probs = [v["fake_probability"] for v in verdicts if v["fake_probability"] is not None]
        video_p = float(np.mean(probs)) if probs else None
        out.append({"file": path.name, "truth": labels.get(path.name, "?"),
                    "video_fake_probability": video_p,
                    "video_label": None if video_p is None else
                    ("fake" if video_p >= scorer.threshold else "real"),
                    "clips": [{k: v[k] for k in ("clip_index", "start_s", "end_s", "faces_scored",
                                                  "fake_probability", "label", "tracks")}
                              for v in verdicts]})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--checkpoint", type=Path, help="default: the shipped model")
    p.add_argument("--sample-fps", type=float, default=2.0)
    p.add_argument("--clip-seconds", type=float, default=10.0)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    result = clip_verdicts(a.folder, a.checkpoint, a.sample_fps, a.clip_seconds)
    text = json.dumps(result, indent=1)
    if a.out:
        a.out.write_text(text)
    for r in result:
        print(f"{r['file']}: truth {r['truth']}, p {r['video_fake_probability']}, "
              f"verdict {r['video_label']} ({len(r['clips'])} clips)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
