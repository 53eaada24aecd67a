"""Self-blended images (Shiohara & Yamasaki, "Detecting Deepfakes with Self-Blended Images",
CVPR 2022): a synthetic forgery made from one real face crop.

The crop is copied into a source and a target; one of them (chosen at random) gets colour
(RGB shift +-20, HSV, brightness/contrast) and sharpness (sharpen or blur) jitter; the source is
shifted (x +-3 %, y +-1.5 %) and scaled (0.95-1.05); a soft face mask (convex hull of the
landmarks, enlarged, or an ellipse inside the face box when there are none) is blurred twice with
random strengths, limited to the face box and scaled by a random blend ratio; the output is `m * src + (1 - m) * tgt`.
Everything is drawn from the caller's `numpy.random.Generator`, so results are reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

BLEND_RATIOS = (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)


@dataclass
class Blend:
    image: np.ndarray  # uint8 (S, S, 3): the self-blended forgery
    mask: np.ndarray  # float32 (S, S) in [0, 1]: weight of the source
    source: np.ndarray  # uint8: the transformed source
    target: np.ndarray  # uint8: the target (background)


def _check(crop: np.ndarray) -> None:
    if not isinstance(crop, np.ndarray) or crop.dtype != np.uint8 or crop.ndim != 3 \
            or crop.shape[2] != 3 or crop.shape[0] != crop.shape[1] or crop.shape[0] < 16:
        raise ValueError(f"self-blending needs a square uint8 (S, S, 3) crop with S >= 16, got "
                         f"{getattr(crop, 'dtype', type(crop))} {getattr(crop, 'shape', '')}")


def colour_jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """RGB shift, HSV shift, brightness/contrast: the colour part of the source-target augmentation."""
    x = img.astype(np.int16) + rng.integers(-20, 21, 3, dtype=np.int16)
    hsv = np.asarray(Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).convert("HSV")).astype(np.int16)
    hsv[..., 0] = (hsv[..., 0] + rng.integers(-8, 9)) % 256
    hsv[..., 1:] += rng.integers(-20, 21, 2, dtype=np.int16)
    out = Image.fromarray(np.clip(hsv, 0, 255).astype(np.uint8), "HSV").convert("RGB")
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.9, 1.1))
    out = ImageEnhance.Contrast(out).enhance(rng.uniform(0.9, 1.1))
    return np.asarray(out)


def sharpness_jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    pil = Image.fromarray(img)
    if rng.random() < 0.5:
        pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    else:
        pil = pil.filter(ImageFilter.UnsharpMask(radius=2, percent=int(rng.integers(50, 150)), threshold=0))
    return np.asarray(pil)


def shift_scale(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scale about the centre by 0.95-1.05 and shift by up to 3 % (x) / 1.5 % (y)."""
    s = img.shape[0]
    scale = rng.uniform(0.95, 1.05)
    dx, dy = rng.uniform(-0.03, 0.03) * s, rng.uniform(-0.015, 0.015) * s
    c = (s - 1) / 2.0
    # PIL maps output (x, y) to input (a x + b y + c, d x + e y + f).
    coeffs = (1 / scale, 0, c - (c + dx) / scale, 0, 1 / scale, c - (c + dy) / scale)
    return np.asarray(Image.fromarray(img).transform((s, s), Image.Transform.AFFINE, coeffs,
                                                     Image.Resampling.BILINEAR))


def face_mask(size: int, rng: np.random.Generator, landmarks: Optional[Sequence[Sequence[float]]] = None,
              margin: float = 0.3) -> np.ndarray:
    """Soft mask of the face region of a crop made with `margin` (float32, values in [0, 1])."""
    pil = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(pil)
    pts = None if landmarks is None else np.asarray(landmarks, np.float64)
    if pts is not None and pts.shape[0] >= 3:
        centre = pts.mean(0)
        grown = centre + (pts - centre) * rng.uniform(1.4, 1.9)
        grown[:, 1] = np.where(grown[:, 1] > centre[1], grown[:, 1] + 0.08 * size, grown[:, 1] - 0.06 * size)
        draw.polygon([tuple(p) for p in np.clip(_hull(grown), 0, size - 1)], fill=255)
    else:
        face = size / (1.0 + margin)  # side of the detected box inside the crop
        c = size / 2.0
        rx, ry = face / 2 * rng.uniform(0.7, 0.9), face / 2 * rng.uniform(0.8, 1.0)
        draw.ellipse((c - rx, c - ry, c + rx, c + ry), fill=255)
    m = np.asarray(pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.01, 0.05) * size)), np.float32)
    m /= max(m.max(), 1e-6)
    m[m < rng.uniform(0.5, 0.95)] = 0  # erode the blurred edge before the second, softer blur
    m = np.asarray(Image.fromarray((m * 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(rng.uniform(0.02, 0.08) * size)), np.float32)
    m /= max(m.max(), 1e-6)
    # Blending stays inside the detected face box (the centre square of a crop made with `margin`).
    lo = int(np.floor(size / 2.0 - size / (1.0 + margin) / 2.0))
    inside = np.zeros_like(m)
    inside[lo:size - lo, lo:size - lo] = 1.0
    return (m * inside * rng.choice(BLEND_RATIOS)).astype(np.float32)


def _hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (monotone chain) of 2-D points, counter-clockwise."""
    pts = sorted(map(tuple, points))
    if len(pts) < 3:
        return np.asarray(pts)

    def half(seq):
        out: list = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out

    lower, upper = half(pts), half(reversed(pts))
    return np.asarray(lower[:-1] + upper[:-1])


def self_blend(crop: np.ndarray, rng: np.random.Generator,
               landmarks: Optional[Sequence[Sequence[float]]] = None, margin: float = 0.3) -> Blend:
    """A self-blended forgery of one real uint8 crop (see module doc)."""
    _check(crop)
    src, tgt = crop.copy(), crop.copy()
    if rng.random() < 0.5:
        src = sharpness_jitter(colour_jitter(src, rng), rng)
    else:
        tgt = sharpness_jitter(colour_jitter(tgt, rng), rng)
    src = shift_scale(src, rng)
    mask = face_mask(crop.shape[0], rng, landmarks, margin)
    m = mask[..., None]
    out = np.clip(np.rint(m * src + (1 - m) * tgt), 0, 255).astype(np.uint8)
    return Blend(out, mask, src, tgt)
