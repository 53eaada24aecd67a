"""Degradations of face crops: training augmentation and the robustness perturbations of
`pel evaluate` are the same functions.

Each transform maps one uint8 (S, S, 3) crop to another of the same shape; randomness comes from
the caller's `numpy.random.Generator`. `augment` applies the transforms of an `AugmentConfig`,
each with its probability, to real and fake crops alike (so none can become a label cue). They
stand for what a stream does to a face: mirrored framing, detector jitter, lighting, scalers,
sensor noise, dropped pixels, JPEG and H.264 coding.
"""
from __future__ import annotations

import io
from fractions import Fraction

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from pel_model.config import AugmentConfig


def _pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(img))


def _arr(pil: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(pil.convert("RGB")))


def gaussian_noise(img: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise, `std` on the 0-255 scale."""
    return np.clip(np.rint(img + rng.normal(0.0, std, img.shape)), 0, 255).astype(np.uint8)


def salt_pepper(img: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Impulse noise: `fraction` of the pixels set to black or white (all channels)."""
    out = img.copy()
    hit = rng.random(img.shape[:2]) < fraction
    out[hit] = np.where(rng.random(int(hit.sum())) < 0.5, 0, 255)[:, None].astype(np.uint8)
    return out


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return _arr(_pil(img).filter(ImageFilter.GaussianBlur(sigma)))


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    _pil(img).save(buf, format="JPEG", quality=int(quality))
    return _arr(Image.open(io.BytesIO(buf.getvalue())))


def rescale(img: np.ndarray, factor: float) -> np.ndarray:
    """Down by `factor` (bilinear, antialiased) and back up to the original size (bicubic)."""
    s = img.shape[0]
    small = max(8, int(round(s * factor)))
    return _arr(_pil(img).resize((small, small), Image.Resampling.BILINEAR)
                .resize((s, s), Image.Resampling.BICUBIC))


def h264(img: np.ndarray, crf: int) -> np.ndarray:
    """One frame through libx264 (yuv420p, `crf`) and back: the codec artefacts of a stream."""
    import av

    s = img.shape[0]
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=Fraction(25, 1))
        stream.width = stream.height = s
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(int(crf)), "preset": "ultrafast", "tune": "zerolatency"}
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), "rgb24")):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    buf.seek(0)
    with av.open(buf) as inp:
        frame = next(inp.decode(video=0))
        return np.ascontiguousarray(frame.to_ndarray(format="rgb24"))


def shift_scale(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Zoom 0.9-1.1 and shift up to 5 % (another detector's box of the same face); the
    uncovered border is mirrored, as in `crop_face`."""
    s = img.shape[0]
    zoom = rng.uniform(0.9, 1.1)
    dx, dy = rng.uniform(-0.05, 0.05, 2) * s
    pad = s // 4
    big = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    c = (s - 1) / 2.0 + pad
    # PIL maps output (x, y) to input (a x + b y + c, d x + e y + f).
    coeffs = (1 / zoom, 0, c + dx - (s - 1) / 2.0 / zoom, 0, 1 / zoom, c + dy - (s - 1) / 2.0 / zoom)
    return _arr(_pil(big).transform((s, s), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR))


def colour(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation 0.7-1.3, hue +-4 %."""
    pil = _pil(img)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        pil = enhance(pil).enhance(rng.uniform(0.7, 1.3))
    hsv = np.asarray(pil.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.integers(-10, 11))) % 256
    return _arr(Image.fromarray(hsv, "HSV"))


def augment(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """`img` with each transform of `cfg` applied with its probability (see module doc)."""
    if rng.random() < cfg.flip:
        img = img[:, ::-1]
    if rng.random() < cfg.shift_scale:
        img = shift_scale(img, rng)
    if rng.random() < cfg.colour:
        img = colour(img, rng)
    if rng.random() < cfg.rescale:
        img = rescale(img, rng.uniform(0.3, 0.9))
    if rng.random() < cfg.blur:
        img = gaussian_blur(img, rng.uniform(0.3, 2.0))
    if rng.random() < cfg.gaussian_noise:
        img = gaussian_noise(img, rng.uniform(2.0, 15.0), rng)
    if rng.random() < cfg.impulse_noise:
        img = salt_pepper(img, rng.uniform(0.002, 0.02), rng)
    if rng.random() < cfg.jpeg:
        img = jpeg(img, int(rng.integers(30, 96)))
    if rng.random() < cfg.h264:
        img = h264(img, int(rng.integers(20, 41)))
    return np.ascontiguousarray(img)
