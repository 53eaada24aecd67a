"""Sample media for the demo and tests: a real face photo encoded into an H.264 clip with PyAV.

The photo is scikit-image's astronaut (a real portrait that ships with the package), so the
quick start needs no downloads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

import av
import numpy as np


def astronaut() -> np.ndarray:
    """The default face photo: scikit-image's astronaut (a real portrait, 512x512 RGB)."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


def _resize(img: np.ndarray, height: int) -> np.ndarray:
    from skimage.transform import resize

    width = max(2, round(img.shape[1] * height / img.shape[0]))
    out = resize(img, (height, width), order=1, anti_aliasing=True, preserve_range=True)
    return out.astype(np.uint8)


def make_face_video(
    path: str | Path,
    images: Optional[Sequence[np.ndarray]] = None,
    seconds: float = 4.0,
    fps: int = 25,
    size: tuple[int, int] = (640, 480),
    codec: str = "libx264",
    faststart: bool = True,
) -> Path:
    """Encode `seconds` of video with the face photos side by side, drifting a few pixels.

    Keyframes every second so HLS segmenting and RTMP joins are quick. Returns `path`.
    """
    path = Path(path)
    photos = list(images) if images else [astronaut()]
    width, height = size
    slot_w = width // len(photos)
    tiles = []
    for img in photos:
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"face images must be HxWx3 RGB, got shape {img.shape}")
        tile = _resize(img.astype(np.uint8), int(height * 0.8))
        if tile.shape[1] > slot_w - 16:
            tile = _resize(tile, int(tile.shape[0] * (slot_w - 16) / tile.shape[1]))
        tiles.append(tile)
    def frames():
        for i in range(max(1, round(seconds * fps))):
            canvas = np.full((height, width, 3), 40 + (i % 50), np.uint8)
            dx = int(6 * np.sin(2 * np.pi * i / fps))
            dy = int(4 * np.cos(2 * np.pi * i / fps))
            for k, tile in enumerate(tiles):
                th, tw = tile.shape[:2]
                x = k * slot_w + (slot_w - tw) // 2 + dx
                y = (height - th) // 2 + dy
                x, y = min(max(x, 0), width - tw), min(max(y, 0), height - th)
                canvas[y : y + th, x : x + tw] = tile
            yield canvas

    return encode_video(path, frames(), fps, size, codec, faststart)


def encode_video(path: str | Path, frames: Iterable[np.ndarray], fps: int = 25,
                 size: tuple[int, int] = (640, 480), codec: str = "libx264",
                 faststart: bool = True, crf: int = 23) -> Path:
    """Encode HxWx3 uint8 RGB frames (of `size`) with keyframes every second. Returns `path`."""
    path = Path(path)
    width, height = size
    options = {"movflags": "faststart"} if faststart and path.suffix in (".mp4", ".mov") else {}
    with av.open(str(path), mode="w", options=options) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = fps
        if codec == "libx264":
            stream.codec_context.options = {"preset": "veryfast", "crf": str(crf)}
        for i, canvas in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(canvas, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
