"""Binary defect masks: conversion, the ImageEditor value, morphology, feathering, random masks.

Conventions
-----------
- A *mask* is ``H×W uint8`` with values {0, 255} (255 = defect / region to change).
- A *feather alpha* is ``H×W float32`` in [0, 1].
- Morphology uses the exact Euclidean distance transform, so ``dilate(mask, px)`` is a dilation by
  a disc (the round "elliptical" structuring element) of radius ``px``, and
  ``feather(mask, r) == 0`` everywhere outside ``dilate(mask, r)`` holds exactly by construction.
- Errors a user can fix raise :class:`MaskError`; its message is shown in the UI as-is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

STYLES = ("scratch", "crack", "blob", "broken", "color")


class MaskError(ValueError):
    """A user-facing problem with a mask (the message is shown as-is)."""


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------
def _as_array(x: Any) -> np.ndarray:
    if isinstance(x, (str, Path)):
        try:
            with Image.open(x) as im:
                im.load()
                x = im.copy()
        except (OSError, ValueError) as exc:
            raise MaskError(f"Cannot read the mask file {Path(x).name}: {exc}") from exc
    if isinstance(x, Image.Image):
        if x.mode == "P":
            x = x.convert("RGBA")
        elif x.mode not in ("1", "L", "LA", "RGB", "RGBA", "I", "I;16", "F"):
            x = x.convert("RGBA")
        x = np.asarray(x)
    return np.asarray(x)


def to_binary(mask_like: Any, threshold: int = 127) -> np.ndarray:
    """Anything mask-like → ``H×W uint8 {0, 255}``.

    Accepts ``H×W`` (uint8 / bool / float in 0..1 — floats with max ≤ 1 are scaled by 255),
    ``H×W×1``, ``H×W×2`` (grey + alpha), ``H×W×3`` (any channel > threshold), ``H×W×4`` (the
    alpha channel > threshold; if the alpha is uniform, e.g. an opaque black/white PNG, the RGB
    channels are used instead), PIL images and file paths.
    """
    arr = _as_array(mask_like)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.dtype == bool:
        return np.where(arr if arr.ndim == 2 else arr.any(axis=2), 255, 0).astype(np.uint8)
    if arr.dtype.kind == "f":
        finite = np.nan_to_num(arr.astype(np.float32), nan=0.0)
        arr = finite * 255.0 if finite.size and finite.max() <= 1.0 else finite
    if arr.ndim == 2:
        on = arr > threshold
    elif arr.ndim == 3 and arr.shape[2] == 2:
        on = arr[..., 1] > threshold
    elif arr.ndim == 3 and arr.shape[2] == 4:
        alpha = arr[..., 3]
        if alpha.size and alpha.min() == alpha.max():
            on = (arr[..., :3] > threshold).any(axis=2) if alpha.max() > threshold else \
                np.zeros(alpha.shape, bool)
        else:
            on = alpha > threshold
    elif arr.ndim == 3 and arr.shape[2] == 3:
        on = (arr > threshold).any(axis=2)
    else:
        raise MaskError(f"A mask must be a 2-D image (H×W, H×W×3 or H×W×4); got shape {arr.shape}")
    return np.where(on, 255, 0).astype(np.uint8)


def _hw(shape: Any) -> tuple[int, int]:
    return int(shape[0]), int(shape[1])


def _layer_to_binary(layer: Any) -> np.ndarray:
    """One ImageEditor layer → binary: alpha > 0, or any non-zero channel when there is no alpha."""
    arr = _as_array(layer)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 4:
        on = arr[..., 3] > 0
    elif arr.ndim == 3 and arr.shape[2] == 2:
        on = arr[..., 1] > 0
    elif arr.ndim == 3:
        on = (arr != 0).any(axis=2)
    elif arr.ndim == 2:
        on = arr != 0
    else:
        raise MaskError(f"Cannot read a painted layer of shape {arr.shape}")
    return np.where(on, 255, 0).astype(np.uint8)


def resize_nearest(mask: np.ndarray, shape: Any) -> np.ndarray:
    h, w = _hw(shape)
    if mask.shape[:2] == (h, w):
        return mask
    return cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)


def mask_from_editor(value: Any, shape: Any = None) -> np.ndarray:
    """The value of a gradio ``gr.ImageEditor`` → binary mask (union of the painted layers).

    ``value`` is ``{"background": ..., "layers": [...], "composite": ...}`` where each entry is a
    numpy array (H×W×4 RGBA or H×W×3), a PIL image, a file path or None. A layer pixel is painted
    when its alpha is > 0 (RGB layers without alpha: any non-zero channel). With no layers (or
    ``value=None``) the result is an all-zero mask of ``shape`` (or the background's shape).
    Layers whose size differs from ``shape`` are resized with nearest-neighbour interpolation.
    A bare array / PIL image instead of a dict is treated as a mask (see :func:`to_binary`).
    """
    if value is not None and not isinstance(value, dict):
        mask = to_binary(value)
        return resize_nearest(mask, shape) if shape is not None else mask
    value = value or {}
    layers = [layer for layer in (value.get("layers") or []) if layer is not None]
    if shape is None:
        for key in ("background", "composite"):
            if value.get(key) is not None:
                shape = _as_array(value[key]).shape
                break
        else:
            if layers:
                shape = _as_array(layers[0]).shape
    if shape is None:
        raise MaskError("No image in the editor — load a product image, then paint the defect")
    h, w = _hw(shape)
    out = np.zeros((h, w), np.uint8)
    for layer in layers:
        np.maximum(out, resize_nearest(_layer_to_binary(layer), (h, w)), out=out)
    return out


# --------------------------------------------------------------------------------------------
# Morphology and feathering
# --------------------------------------------------------------------------------------------
def _dist_outside(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance (px) of every pixel to the nearest mask pixel (0 on the mask)."""
    if not mask.any():
        return np.full(mask.shape, np.inf, np.float32)
    return cv2.distanceTransform(np.where(mask > 0, 0, 255).astype(np.uint8),
                                 cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def _dist_inside(mask: np.ndarray) -> np.ndarray:
    """Distance of every mask pixel to the nearest non-mask pixel (pixels beyond the image
    border do not count as background, like ``cv2.erode``'s default border)."""
    src = np.where(mask > 0, 255, 0).astype(np.uint8)
    if src.all():
        return np.full(mask.shape, np.inf, np.float32)
    return cv2.distanceTransform(src, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def dilate(mask: np.ndarray, px: float) -> np.ndarray:
    """Dilate by a disc of radius ``px`` (exact Euclidean); ``px <= 0`` returns a copy."""
    mask = to_binary(mask)
    if px <= 0:
        return mask.copy()
    return np.where(_dist_outside(mask) <= px, 255, 0).astype(np.uint8)


def erode(mask: np.ndarray, px: float) -> np.ndarray:
    """Erode by a disc of radius ``px`` (exact Euclidean); ``px <= 0`` returns a copy."""
    mask = to_binary(mask)
    if px <= 0:
        return mask.copy()
    return np.where(_dist_inside(mask) > px, 255, 0).astype(np.uint8)


def feather(mask: np.ndarray, radius: float) -> np.ndarray:
    """Soft alpha ``H×W float32``: exactly 1 on the mask, a smoothstep ramp outside it that
    reaches exactly 0 at distance ≥ ``radius`` (so alpha == 0 outside ``dilate(mask, radius)``).
    ``radius <= 0`` gives the hard mask as 0/1."""
    mask = to_binary(mask)
    if radius <= 0:
        return (mask > 0).astype(np.float32)
    t = np.clip(1.0 - _dist_outside(mask) / float(radius), 0.0, 1.0).astype(np.float32)
    return t * t * (3.0 - 2.0 * t)


VISIBLE_DELTA = 6.0      # grey levels (blurred, largest channel) a change must reach to be labelled
MIN_VISIBLE = 0.05       # below this share of the mask, the painted mask is kept as the label


def visible_label(before: np.ndarray, after: np.ndarray, mask: np.ndarray, delta: float = VISIBLE_DELTA,
                  grow: float = 3.0, min_share: float = MIN_VISIBLE) -> np.ndarray:
    """``H×W bool``: the part of ``mask`` where ``after`` visibly differs from ``before`` — the
    largest channel's ``|Δ|``, blurred (σ 1.5), above ``delta``, grown by ``grow`` px, holes
    closed, cut to the mask. This is the label a synthetic defect is trained with: a generator
    that moves or removes a thin part (a lead bent inside a painted blob) changes only some of
    the painted pixels, and labelling the untouched board around it as defect teaches a
    segmenter to flag normal pixels. Where less than ``min_share`` of the mask changed
    visibly, the painted mask is returned (the defect is faint everywhere, not absent)."""
    m = np.asarray(mask) > 0
    a = np.asarray(before, np.float32)
    b = np.asarray(after, np.float32)
    if a.shape != b.shape or a.shape[:2] != m.shape:
        raise ValueError(f"visible_label: images {a.shape} / {b.shape} and mask {m.shape} differ in size")
    d = np.abs(b - a)
    d = d.max(axis=2) if d.ndim == 3 else d
    d = cv2.GaussianBlur(d, (0, 0), 1.5)
    changed = dilate(((d > delta) & m).astype(np.uint8) * 255, grow) > 0
    changed = cv2.morphologyEx(changed.astype(np.uint8), cv2.MORPH_CLOSE,
                               cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))) > 0
    label = changed & m
    if label.sum() < min_share * max(1, int(m.sum())):
        return m.copy()
    return label


def invert(mask: np.ndarray) -> np.ndarray:
    return np.where(to_binary(mask) > 0, 0, 255).astype(np.uint8)


def clear(shape: Any) -> np.ndarray:
    return np.zeros(_hw(shape), np.uint8)


def bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` with exclusive ends, or None for an empty mask."""
    m = np.asarray(mask) > 0
    if m.ndim == 3:
        m = m.any(axis=2)
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def area(mask: np.ndarray) -> int:
    m = np.asarray(mask)
    return int(np.count_nonzero(m if m.ndim == 2 else m.any(axis=2)))


def validate_mask(mask: Any, image_shape: Any, min_pixels: int = 1) -> np.ndarray:
    """Binary mask of the image's size with at least ``min_pixels`` painted, else MaskError."""
    if mask is None:
        raise MaskError("The mask is empty — paint the defect region first")
    m = to_binary(mask)
    ih, iw = _hw(image_shape)
    if m.shape != (ih, iw):
        mh, mw = m.shape
        raise MaskError(f"The mask is {mw}×{mh} px but the image is {iw}×{ih} px — "
                        "repaint it on this image or resize it")
    n = area(m)
    if n == 0:
        raise MaskError("The mask is empty — paint the defect region first")
    if n < min_pixels:
        raise MaskError(f"The mask covers only {n} px; paint at least {min_pixels} px")
    return m


# --------------------------------------------------------------------------------------------
# Random masks
# --------------------------------------------------------------------------------------------
def _pick_point(rng: np.random.Generator, candidates: np.ndarray | None,
                shape: tuple[int, int], margin: float = 0.0) -> tuple[float, float]:
    """A random (x, y): a pixel of ``candidates`` (binary) or a point of the image."""
    h, w = shape
    if candidates is not None and candidates.any():
        ys, xs = np.nonzero(candidates)
        i = int(rng.integers(len(xs)))
        return float(xs[i]), float(ys[i])
    mx, my = min(margin, w / 2 - 0.5), min(margin, h / 2 - 0.5)
    return float(rng.uniform(mx, w - 1 - mx)), float(rng.uniform(my, h - 1 - my))


def _polar_blob(rng, centre, r0, n_harm, amp, aspect=(0.6, 1.4), n=72) -> np.ndarray:
    """Vertices of a closed irregular blob: r(φ) = r0 · (1 + Σ a_k cos(kφ + p_k)), stretched and
    rotated into an ellipse."""
    phi = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones_like(phi)
    for k in range(2, 2 + n_harm):
        r += rng.uniform(0, amp) / np.sqrt(k - 1) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    r = r0 * np.clip(r, 0.35, None)
    sx = rng.uniform(*aspect)
    x, y = r * np.cos(phi) * sx, r * np.sin(phi) / sx
    rot = rng.uniform(0, np.pi)
    c, s = np.cos(rot), np.sin(rot)
    return np.stack([centre[0] + c * x - s * y, centre[1] + s * x + c * y], axis=1)


def _draw_polyline(mask, pts, thickness):
    cv2.polylines(mask, [np.round(pts).astype(np.int32).reshape(-1, 1, 2)], False, 255,
                  int(max(1, thickness)), lineType=cv2.LINE_8)


def _scratch(rng, shape, centre, s):
    mask = np.zeros(shape, np.uint8)
    length = rng.uniform(0.25, 0.6) * s
    n = 40
    step = length / n
    theta0 = rng.uniform(0, 2 * np.pi)
    kappa = rng.uniform(-1.0, 1.0) * 0.9 / n            # gentle constant bend
    half = []
    for direction in (1.0, -1.0):
        theta = theta0 if direction > 0 else theta0 + np.pi
        x, y = centre
        pts = []
        for _ in range(n // 2):
            theta += direction * kappa + rng.normal(0, 0.02)
            x, y = x + step * np.cos(theta), y + step * np.sin(theta)
            pts.append((x, y))
        half.append(pts)
    pts = np.array(half[1][::-1] + [centre] + half[0])
    _draw_polyline(mask, pts, int(rng.integers(2, 6)))
    return mask


def _jagged_path(rng, start, theta0, length, step, jitter):
    pts = [start]
    x, y = start
    for _ in range(max(2, int(length / step))):
        theta = theta0 + rng.normal(0, jitter)
        x, y = x + step * np.cos(theta), y + step * np.sin(theta)
        pts.append((x, y))
    return np.array(pts)


def _crack(rng, shape, centre, s):
    mask = np.zeros(shape, np.uint8)
    length = rng.uniform(0.25, 0.55) * s
    step = max(2.0, s / 45)
    theta0 = rng.uniform(0, 2 * np.pi)
    a = _jagged_path(rng, centre, theta0, length / 2, step, 0.6)
    b = _jagged_path(rng, centre, theta0 + np.pi, length / 2, step, 0.6)
    main = np.concatenate([b[::-1], a[1:]])
    _draw_polyline(mask, main, int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(1, 4))):
        origin = main[int(rng.integers(len(main)))]
        angle = theta0 + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2) + rng.choice([0, np.pi])
        branch = _jagged_path(rng, tuple(origin), angle, length * rng.uniform(0.15, 0.4), step, 0.6)
        _draw_polyline(mask, branch, int(rng.integers(1, 3)))
    return mask


def _fill(shape, pts):
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32).reshape(-1, 1, 2)], 255, lineType=cv2.LINE_8)
    return mask


def random_mask(style: str, shape: Any, rng: np.random.Generator | int | None = None,
                region: np.ndarray | None = None) -> np.ndarray:
    """A plausible random mask for a defect ``style`` (one of :data:`STYLES`), never empty.

    - ``scratch``: thin (2–5 px) long gently curved polyline;
    - ``crack``: jagged thin line with 1–3 branches;
    - ``blob``: irregular ellipse-like blob (stains, contamination);
    - ``broken``: jagged chunk; centred on the region's boundary when ``region`` is given;
    - ``color``: larger, smoother blob.

    ``region`` (binary mask of the product) constrains the mask to lie inside it.
    ``rng`` is a ``numpy.random.Generator`` or a seed.
    """
    if style not in STYLES:
        raise MaskError(f"Unknown mask style {style!r}; known: {', '.join(STYLES)}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    h, w = _hw(shape)
    if h < 1 or w < 1:
        raise MaskError(f"Cannot make a mask of size {w}×{h} px")
    reg = None
    if region is not None:
        reg = to_binary(region)
        if reg.shape != (h, w):
            raise MaskError(f"The product region is {reg.shape[1]}×{reg.shape[0]} px but the "
                            f"image is {w}×{h} px")
        if not reg.any():
            raise MaskError("The product region is empty — there is nowhere to put a defect")
    s = float(min(h, w))
    for _ in range(20):
        if style == "broken":
            r0 = rng.uniform(0.06, 0.14) * s
            if reg is not None:
                edge = cv2.subtract(reg, erode(reg, 1))   # pixels on the region's boundary
                centre = _pick_point(rng, edge if edge.any() else reg, (h, w))
            else:
                centre = _pick_point(rng, None, (h, w), margin=r0 * 0.5)
            m = _fill((h, w), _polar_blob(rng, centre, r0, n_harm=10, amp=0.35, n=18,
                                          aspect=(0.7, 1.3)))
        else:
            r0 = {"blob": rng.uniform(0.04, 0.11), "color": rng.uniform(0.12, 0.24)}.get(
                style, 0.0) * s
            inner = None
            if reg is not None:
                inner = erode(reg, max(1.0, 0.5 * r0 if r0 else 0.06 * s))
                inner = inner if inner.any() else reg
            centre = _pick_point(rng, inner, (h, w), margin=r0 * 0.7)
            if style == "scratch":
                m = _scratch(rng, (h, w), centre, s)
            elif style == "crack":
                m = _crack(rng, (h, w), centre, s)
            elif style == "blob":
                m = _fill((h, w), _polar_blob(rng, centre, max(r0, 1.5), n_harm=6, amp=0.3))
            else:
                m = _fill((h, w), _polar_blob(rng, centre, max(r0, 2.0), n_harm=3, amp=0.2))
        if reg is not None:
            m = cv2.bitwise_and(m, reg)
        if area(m) >= min(12, (h * w) // 4 or 1):
            return m
    # Degenerate region or image: a small disc at a region pixel (never empty).
    x, y = _pick_point(rng, reg, (h, w))
    m = np.zeros((h, w), np.uint8)
    cv2.circle(m, (int(x), int(y)), 2, 255, -1)
    m[int(y), int(x)] = 255
    return cv2.bitwise_and(m, reg) if reg is not None else m
