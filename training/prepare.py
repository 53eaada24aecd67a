"""`pel prepare`: sample frames, detect and crop faces with the service's own `extract_faces`,
cache the crops with an index. Parallel over the Ray cluster (one task per video, or per archive
for WildDeepfake), resumable (finished videos are skipped), with a tqdm progress bar.

Output folder:
- `manifest.json`: crop size, frames per video, crop format, face config, dataset.
- `videos/<id>.json`: one record per finished video (status `ok` or `no_face`, its crop rows).
- `crops/<id>/<frame>.png|jpg` or `crops/<id>.npz` (one array per frame, key `f<frame>`).
- `index.jsonl`: one row per crop: video, frame, label, split, method, dataset, group (the
  source video it shares with others, e.g. a fake and its real; else the video), box (frame
  pixels, with score), landmarks (crop pixels), path (relative to the folder).
- `report.json`: counts per split and label, videos without faces, videos that failed to read.

Per frame the largest detected face is kept (for manipulated videos the target face is normally
the dominant one); frames without a face contribute no crop and are counted in the record.

Face-crop mode (`TrainConfig.face_crops`, `pel prepare --face-crops`) is for datasets whose
images already are face crops: each image is padded before detection and falls back to the
whole image as the face box when no face is found (`pel_model.faces.face_crop_input`), so no
input is lost; rows say `fallback: true` and `report.json` counts them.
"""
from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from pel_model.config import FaceConfig, TrainConfig
from pel_model.faces import crop_face_input, extract_faces, make_detector, square_box
from pel_model.faces.face_crop_input import detector_config

from .datasets import Source
from .media import MediaError, archive_frames, image_frame, video_frames

log = logging.getLogger(__name__)
INDEX = "index.jsonl"


class PrepareError(RuntimeError):
    """Some sources could not be read; the message lists them (finished videos are kept)."""


@dataclass
class PrepareSummary:
    out_dir: Path
    videos: int
    skipped_done: int
    crops: int
    no_face: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    fallbacks: int = 0  # face-crop mode: inputs whose whole image became the face box


def safe_id(video_id: str) -> str:
    parts = [re.sub(r"[^A-Za-z0-9_.-]", "_", p) for p in video_id.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise ValueError(f"unusable video id {video_id!r}")
    return "/".join(parts)


def _landmarks_in_crop(face, margin: float, frame_shape, size: int) -> Optional[list[list[float]]]:
    if face.landmarks is None:
        return None
    x0, y0, x1, _ = square_box(face, margin, frame_shape)
    s = size / float(x1 - x0)
    return [[round((x - x0) * s, 2), round((y - y0) * s, 2)] for x, y in face.landmarks]


def _write_crop(out_dir: Path, sid: str, frame: int, crop: np.ndarray, fmt: str,
                npz: dict[str, np.ndarray]) -> str:
    if fmt == "npz":
        npz[f"f{frame:06d}"] = crop
        return f"crops/{sid}.npz#f{frame:06d}"
    rel = f"crops/{sid}/{frame:06d}.{fmt}"
    path = out_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(crop)
    img.save(path, quality=95) if fmt == "jpg" else img.save(path)
    return rel


def _frames_of(group: list[Source], n: int) -> dict[str, list[tuple[int, np.ndarray]]]:
    first = group[0]
    if first.kind == "frames":
        return archive_frames(first.path, {s.id: s.frames for s in group}, n)
    if first.kind == "image":
        return {first.id: image_frame(first.path)}
    return {first.id: video_frames(first.path, n)}


def _detector(faces: FaceConfig, face_crops: bool):
    return make_detector(detector_config(faces) if face_crops else faces)


def _faces_of(frame: np.ndarray, detector, faces: FaceConfig, size: int, face_crops: bool):
    """(face, crop, fell_back) of the face kept for this frame, or None."""
    if face_crops:
        return crop_face_input(frame, detector, faces, size)
    found = extract_faces(frame, detector, faces, size)
    if not found:
        return None
    face, crop = max(found, key=lambda fc: (fc[0].width * fc[0].height, fc[0].score))
    return face, crop, False


def process_groups(groups: list[list[Source]], out_dir: Path, faces: FaceConfig, size: int,
                   n: int, fmt: str, face_crops: bool = False) -> list[dict]:
    """One Ray task: several groups with one detector (building it costs more than a still image)."""
    detector = _detector(faces, face_crops)
    return [r for g in groups
            for r in process_group(g, out_dir, faces, size, n, fmt, detector, face_crops)]


def process_group(group: list[Source], out_dir: Path, faces: FaceConfig, size: int, n: int,
                  fmt: str, detector=None, face_crops: bool = False) -> list[dict]:
    """Prepare sources that share one file; returns one record per source (incl. failures)."""
    detector = detector or _detector(faces, face_crops)
    try:
        frames = _frames_of(group, n)
    except MediaError as exc:
        return [{"id": s.id, "status": "error", "error": str(exc)} for s in group]
    records = []
    for src in group:
        sid = safe_id(src.id)
        rows, npz = [], {}
        for idx, frame in frames[src.id]:
            kept = _faces_of(frame, detector, faces, size, face_crops)
            if kept is None:
                continue
            face, crop, fell_back = kept
            rows.append({"video": src.id, "frame": idx, "label": src.label, "split": src.split,
                         "method": src.method, "dataset": src.dataset,
                         "group": src.group or src.id, "box": face.as_list(),
                         "landmarks": _landmarks_in_crop(face, faces.margin, frame.shape, size),
                         "fallback": fell_back,
                         "path": _write_crop(out_dir, sid, idx, crop, fmt, npz)})
        if npz:
            path = out_dir / "crops" / f"{sid}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **npz)
        record = {"id": src.id, "status": "ok" if rows else "no_face", "label": src.label,
                  "split": src.split, "method": src.method, "source": str(src.path),
                  "frames_sampled": len(frames[src.id]), "rows": rows}
        rec_path = out_dir / "videos" / f"{sid}.json"
        rec_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = rec_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(rec_path)  # the record appears only once all its crops are written
        records.append(record)
    return records


def _check_manifest(out_dir: Path, manifest: dict) -> None:
    path = out_dir / "manifest.json"
    if path.exists():
        old = json.loads(path.read_text())
        keys = ("size", "frames_per_video", "crop_format", "faces", "face_crops")
        diff = [k for k in keys if old.get(k) != manifest.get(k)]
        if diff:
            raise ValueError(f"{out_dir} was prepared with different {diff} "
                             f"({ {k: old.get(k) for k in diff} }): use another output folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1))


def _groups(sources: list[Source]) -> list[list[Source]]:
    by_file: dict[tuple[str, str], list[Source]] = defaultdict(list)
    for s in sources:
        by_file[(s.kind, str(s.path)) if s.kind == "frames" else ("one", s.id)].append(s)
    return list(by_file.values())


def prepare(sources: list[Source], out_dir: Path, cfg: TrainConfig = TrainConfig(),
            size: Optional[int] = None, use_ray: bool = True, progress: bool = True,
            dataset: str = "", allow_failures: bool = False) -> PrepareSummary:
    """Prepare all `sources` into `out_dir` (see module doc). Raises PrepareError listing the
    sources that failed to read unless `allow_failures` (they are then only reported)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    size = size or cfg.model.input_size
    fmt, n, fc = cfg.crop_format, cfg.frames_per_video, cfg.face_crops
    _check_manifest(out_dir, {"size": size, "frames_per_video": n, "crop_format": fmt,
                              "faces": cfg.faces.model_dump(mode="json"), "face_crops": fc,
                              "dataset": dataset})
    done = {s.id for s in sources if (out_dir / "videos" / f"{safe_id(s.id)}.json").exists()}
    todo = _groups([s for s in sources if s.id not in done])
    bar = tqdm(total=len(sources), initial=len(done), desc="prepare", unit="video",
               disable=not progress)
    results: list[dict] = []
    if use_ray and todo:
        import ray

        task = ray.remote(num_cpus=1)(process_groups)
        per_task = 64 if all(g[0].kind == "image" for g in todo) else 1  # stills are cheap
        pending = [task.remote(todo[i:i + per_task], out_dir, cfg.faces, size, n, fmt, fc)
                   for i in range(0, len(todo), per_task)]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for recs in ray.get(ready):
                results += recs
                bar.update(len(recs))
    else:
        for g in todo:
            recs = process_group(g, out_dir, cfg.faces, size, n, fmt, face_crops=fc)
            results += recs
            bar.update(len(recs))
    bar.close()
    failed = {r["id"]: r["error"] for r in results if r["status"] == "error"}
    summary = _write_index(out_dir, sources, failed)
    summary.skipped_done = len(done)
    if failed and not allow_failures:
        raise PrepareError(f"{len(failed)} of {len(sources)} sources could not be read "
                           f"(finished ones are kept; re-run to resume):\n  "
                           + "\n  ".join(f"{k}: {v}" for k, v in list(failed.items())[:20]))
    return summary


def _write_index(out_dir: Path, sources: list[Source], failed: dict[str, str]) -> PrepareSummary:
    rows, no_face, fallbacks = [], [], 0
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for s in sources:
        path = out_dir / "videos" / f"{safe_id(s.id)}.json"
        if s.id in failed or not path.exists():
            continue
        rec = json.loads(path.read_text())
        if rec["status"] == "no_face":
            no_face.append(s.id)
        rows += rec["rows"]
        counts[s.split]["videos_" + ("fake" if s.label else "real")] += 1
        counts[s.split]["crops_" + ("fake" if s.label else "real")] += len(rec["rows"])
        fallbacks += sum(bool(r.get("fallback")) for r in rec["rows"])
    tmp = out_dir / (INDEX + ".tmp")
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    tmp.replace(out_dir / INDEX)
    if no_face:
        log.warning("%d videos had no detectable face in any sampled frame (listed in %s)",
                    len(no_face), out_dir / "report.json")
    if fallbacks:
        log.info("%d of %d face-crop inputs had no detected face: the whole image is the face box",
                 fallbacks, len(rows))
    (out_dir / "report.json").write_text(json.dumps(
        {"counts": counts, "no_face": no_face, "failed": failed, "fallbacks": fallbacks}, indent=1))
    return PrepareSummary(out_dir, len(sources), 0, len(rows), no_face, failed, fallbacks)


def summary_json(s: PrepareSummary) -> str:
    d = asdict(s)
    d["out_dir"] = str(s.out_dir)
    return json.dumps(d)
