"""Evidence storage: the face crops and heatmaps that moderators review, under a retention limit.

Keys are relative paths, one folder per track of a clip (`track_key`):
`job-<job id>/clip-<index>/track-<id>/face.png` (the exact crop the detector scored, lossless,
so that `pel feedback export` can hand it back to training) and `.../heatmap.png`. The store is
a local folder (`evidence.dir`); on a cluster every node that runs stream workers, the explainer
or the Moderator must mount the same folder (NFS, a shared volume). S3-compatible object stores
are not implemented.

Retention (`sweep`, run by the Moderator): files older than `evidence.retention_hours` go, then
the oldest until the folder holds at most `evidence.max_megabytes`.
"""
from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path
from typing import Optional

import numpy as np

from pel_model.config import EvidenceConfig

_SEGMENT = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,200}$")


def track_key(job_id: str, clip_index: int, track_id: int) -> str:
    """The folder of one track's evidence (job ids may start with '.': the prefix keeps them
    from forming '.' or '..')."""
    return f"job-{job_id}/clip-{int(clip_index):06d}/track-{int(track_id)}"


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


class EvidenceStore:
    def __init__(self, cfg: EvidenceConfig):
        self.cfg = cfg
        self.root = Path(cfg.dir).expanduser()

    def path(self, key: str) -> Path:
        """The file of `key`; ValueError for anything that could leave the store."""
        parts = key.split("/")
        if not parts or not all(_SEGMENT.match(p) for p in parts):
            raise ValueError(f"not an evidence key: {key[:200]!r}")
        return self.root.joinpath(*parts)

    def put(self, key: str, data: bytes) -> str:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers never see half a file
        return key

    def get(self, key: str) -> Optional[bytes]:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        try:
            return self.path(key).is_file()
        except ValueError:
            return False

    def sweep(self, now: Optional[float] = None) -> dict[str, int]:
        """Apply the retention limit; returns what was removed."""
        now = time.time() if now is None else now
        if not self.root.is_dir():
            return {"files": 0, "bytes": 0}
        files = []
        for p in self.root.rglob("*"):
            try:
                if p.is_file():
                    st = p.stat()
                    files.append((st.st_mtime, st.st_size, p))
            except FileNotFoundError:  # removed meanwhile
                continue
        files.sort()
        max_age, budget = self.cfg.retention_hours * 3600, self.cfg.max_megabytes * 1e6
        total = sum(size for _, size, _ in files)
        removed = freed = 0
        for mtime, size, p in files:  # oldest first
            if now - mtime <= max_age and total <= budget:
                break
            p.unlink(missing_ok=True)
            total -= size
            removed, freed = removed + 1, freed + size
        for d in sorted((d for d in self.root.rglob("*") if d.is_dir()),
                        key=lambda d: len(d.parts), reverse=True):
            try:
                d.rmdir()  # only empty folders go
            except OSError:
                pass
        return {"files": removed, "bytes": freed}
