"""Reading frames for preparation: evenly spaced frames of video files (PyAV), PNG frames from
WildDeepfake archives, still images. All return `(frame index, HxWx3 uint8 RGB)` pairs."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Sequence

import av
import numpy as np
from PIL import Image


class MediaError(ValueError):
    """A video, archive or image that cannot be read (the message names the path)."""


def even_indices(total: int, n: int) -> list[int]:
    """`n` evenly spaced indices in [0, total) (all of them when total <= n)."""
    if total <= 0:
        return []
    if total <= n:
        return list(range(total))
    return sorted({int(round(i)) for i in np.linspace(0, total - 1, n)})


def _count_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def video_frames(path: Path, n: int) -> list[tuple[int, np.ndarray]]:
    """`n` evenly spaced frames of a video, decoded sequentially (no seeking, so the chosen
    indices are exact); only the kept frames are converted to RGB."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream")
            total = container.streams.video[0].frames
        if total <= 0:
            total = _count_frames(path)
        wanted = set(even_indices(total, n))
        out = []
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    out.append((i, frame.to_ndarray(format="rgb24")))
                if i >= max(wanted, default=-1):
                    break
    except MediaError:
        raise
    except (av.FFmpegError, OSError, IndexError) as exc:
        raise MediaError(f"{path}: cannot decode video ({exc})") from exc
    if not out:
        raise MediaError(f"{path}: no decodable frames")
    return out


def _to_rgb(img: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img.convert("RGB")))


def image_frame(path: Path) -> list[tuple[int, np.ndarray]]:
    try:
        with Image.open(path) as img:
            return [(0, _to_rgb(img))]
    except OSError as exc:
        raise MediaError(f"{path}: cannot read image ({exc})") from exc


def archive_frames(archive: Path, sequences: dict[str, Sequence[str]], n: int
                   ) -> dict[str, list[tuple[int, np.ndarray]]]:
    """For each sequence (id -> member names in frame order) `n` evenly spaced PNG frames, read in
    one sequential pass over the gzip archive. Frame index = the number in the file name."""
    wanted: dict[str, tuple[str, int]] = {}
    for sid, members in sequences.items():
        for i in even_indices(len(members), n):
            stem = Path(members[i]).stem
            wanted[members[i]] = (sid, int(stem) if stem.isdigit() else i)
    out: dict[str, list[tuple[int, np.ndarray]]] = {sid: [] for sid in sequences}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                hit = wanted.get(member.name)
                if hit is None:
                    continue
                data = tar.extractfile(member)
                if data is None:
                    raise MediaError(f"{archive}:{member.name}: not a regular file")
                try:
                    with Image.open(io.BytesIO(data.read())) as img:
                        out[hit[0]].append((hit[1], _to_rgb(img)))
                except OSError as exc:
                    raise MediaError(f"{archive}:{member.name}: cannot read PNG ({exc})") from exc
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise MediaError(f"{archive}: cannot read archive ({exc})") from exc
    for sid, frames in out.items():
        if len(frames) != len(even_indices(len(sequences[sid]), n)):
            raise MediaError(f"{archive}: frames of {sid} missing from the archive")
        frames.sort(key=lambda t: t[0])
    return out
