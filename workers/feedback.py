"""Moderators' decisions as training data: `pel feedback export --out DIR`.

Every reviewed track (the review page's `<prefix>:reviews`, workers/review.py) whose face crop is
still in the evidence store becomes one row of `DIR/index.csv` (`path,label,group`): the crop the
detector scored, copied to `DIR/faces/`, labelled `fake` when a moderator confirmed it and `real`
when they marked it a false positive; `group` is the job, so one stream's faces stay in one split.
`pel prepare --dataset csv --root DIR/index.csv --face-crops` reads it like any face-crop
dataset, for fine-tuning or for calibrating on the service's own traffic. Reviews whose evidence
expired are counted, not exported.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from pel_model.config import AppConfig

from .evidence_store import EvidenceStore

LABELS = {"confirmed": "fake", "false_positive": "real"}


def export_feedback(r, cfg: AppConfig, out: Path) -> dict:
    """Write the dataset; returns counts. `r` is a Redis client that decodes responses."""
    out = Path(out)
    faces = out / "faces"
    faces.mkdir(parents=True, exist_ok=True)
    store = EvidenceStore(cfg.evidence)
    rows, expired = [], 0
    for field, raw in sorted(r.hgetall(f"{cfg.redis.prefix}:reviews").items()):
        review = json.loads(raw)
        src = review.get("face")
        if review.get("decision") not in LABELS or not src or not store.exists(src):
            expired += 1
            continue
        name = field.replace(":", "-") + ".png"
        shutil.copyfile(store.path(src), faces / name)
        rows.append({"path": f"faces/{name}", "label": LABELS[review["decision"]],
                     "group": review["job_id"]})
    with (out / "index.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "group"])
        writer.writeheader()
        writer.writerows(rows)
    return {"index": str(out / "index.csv"), "faces": len(rows),
            "fake": sum(r["label"] == "fake" for r in rows),
            "real": sum(r["label"] == "real" for r in rows), "without_evidence": expired}
