"""The background fill shared by ``remove`` and ``warp``: the pixels to replace are filled by
copying background from elsewhere — in the target itself and in the good images registered to it
(:mod:`pipelines.generators.align`) — at offsets that preserve the background's pattern (see
:func:`fill_background`); ``cv2.inpaint`` (Telea) covers what no copy can."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import cv2
import numpy as np

from pipelines import masks as mk
from pipelines.generators.align import Aligned, nanmedian0


@dataclass
class Source:
    """An image the fill may copy background from: ``image`` (target's size), ``background``
    (True where it shows background and may be copied)."""
    image: np.ndarray
    background: np.ndarray
    is_target: bool = False


def sources_for(target: np.ndarray, structure: np.ndarray, region: np.ndarray,
                aligned: Sequence[Aligned], margin: int = 2) -> list[Source]:
    """The target (its background outside ``region``) and every registered good (its background
    inside its frame); structure grown by ``margin`` px (its edges and shadows are not copied)."""
    grow = (lambda m: mk.dilate(m, margin) > 0) if margin > 0 else (lambda m: m)
    out = [Source(target, ~grow(structure) & ~region, True)]
    for a in aligned:
        out.append(Source(a.image, ~grow(a.structure) & a.valid))
    return out


@dataclass
class FillResult:
    image: np.ndarray            # H×W×3 float32, the target with the region filled
    inpainted: float             # share of the region left to cv2.inpaint
    pieces: int                  # (source, offset) pieces used
    labels: np.ndarray | None = None   # H×W int: the piece each pixel came from (−1: none)
    used: list = field(default_factory=list)   # (source index, dy, dx) of each piece


def inpaint(image: np.ndarray, region: np.ndarray, structure: np.ndarray | None = None) -> np.ndarray:
    """``cv2.inpaint`` (Telea) of ``region`` from the *background* around it: structure pixels
    near the region (``structure``) are inpainted too, so a bar that enters the region is not
    continued into it; large regions on a shrunk copy (smooth anyway)."""
    out = image.astype(np.float32).copy()
    if not region.any():
        return out
    todo = region.copy()
    if structure is not None:
        todo |= (mk.dilate(structure, 2) > 0) & (mk.dilate(region, 10) > 0)
        if todo.all():
            todo = region.copy()
    img = np.clip(np.round(image), 0, 255).astype(np.uint8)
    h, w = todo.shape
    f = min(1.0, math.sqrt(8000.0 / max(1, int(todo.sum()))))
    if f < 1.0:
        size = (max(8, round(w * f)), max(8, round(h * f)))
        small = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        hole = (cv2.resize(todo.astype(np.uint8) * 255, size, interpolation=cv2.INTER_AREA) > 0)
        fill = cv2.inpaint(small, hole.astype(np.uint8), 4, cv2.INPAINT_TELEA)
        fill = cv2.resize(fill, (w, h), interpolation=cv2.INTER_LINEAR)
    else:
        fill = cv2.inpaint(img, todo.astype(np.uint8), 4, cv2.INPAINT_TELEA)
    out[region] = fill[region]
    return out


def shift_take(img: np.ndarray, ys: np.ndarray, xs: np.ndarray, dy: int, dx: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """``(inside, values)``: whether (y+dy, x+dx) is in the image and the values there."""
    h, w = img.shape[:2]
    ty, tx = ys + dy, xs + dx
    ok = (ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)
    vals = img[np.clip(ty, 0, h - 1), np.clip(tx, 0, w - 1)]
    return ok, vals


PERIODIC = 1000          # label of the pixels the periodic median filled


def periodic_median(region: np.ndarray, sources: Sequence[Source], imgs: Sequence[np.ndarray],
                    offsets: Sequence[tuple[int, int, float]], min_ncc: float = 0.5, nearest: int = 5,
                    min_samples: int = 3) -> tuple[np.ndarray, np.ndarray | None]:
    """``(values [n×3], ok [n])`` for the pixels of ``region`` (``np.nonzero`` order): the
    per-pixel median of the ``nearest`` background samples at the background's period shifts
    (registered goods also at the zero shift), nearest shift first; ``ok`` where at least
    ``min_samples`` exist. ``(…, None)`` when the background does not repeat."""
    offs = [(dy, dx) for dy, dx, c in offsets if c >= min_ncc]
    if len(offs) < 4:
        return np.zeros((0, 3), np.float32), None
    h, w = region.shape
    ys, xs = np.nonzero(region)
    taps = []
    for si, src in enumerate(sources):
        for dy, dx in ([] if src.is_target else [(0, 0)]) + offs:
            taps.append((math.hypot(dy, dx) + (0 if src.is_target else 0.5), si, dy, dx))
    taps.sort()
    taps = taps[:24]
    vals = np.full((len(taps), len(ys), 3), np.nan, np.float32)
    for k, (_, si, dy, dx) in enumerate(taps):
        ty, tx = ys + dy, xs + dx
        ok = (ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)
        ok[ok] &= sources[si].background[ty[ok], tx[ok]]
        vals[k, ok] = imgs[si][ty[ok], tx[ok]]
    valid = np.isfinite(vals[..., 0])
    rank = np.cumsum(valid, axis=0)
    vals[(rank > nearest)] = np.nan
    med = nanmedian0(vals)
    return med, valid.sum(0) >= min_samples


def _candidates(sources: Sequence[Source], offsets, rng: np.random.Generator, span: int) -> list:
    """Every (source, dy, dx) a piece may be copied from: the background's period shifts (best
    24), 16 seeded far shifts (an aperiodic background) and, for a registered good, the zero shift."""
    cand = [(int(dy), int(dx)) for dy, dx, _ in sorted(offsets, key=lambda o: -o[2])[:24]]
    for _ in range(16):                       # seeded far shifts (an aperiodic background)
        a = rng.uniform(0, 2 * np.pi)
        rr = rng.uniform(0.6, 1.6) * span + 4
        cand.append((int(round(rr * math.sin(a))), int(round(rr * math.cos(a)))))
    cands = []
    for si, src in enumerate(sources):
        for dy, dx in (cand if src.is_target else [(0, 0), *cand]):
            if not (src.is_target and dy == 0 and dx == 0):
                cands.append((si, dy, dx))
    return cands


def _score(cands, sources, imgs, out, remaining, known, ring: int, min_px: int) -> list:
    """``[(cost, candidate index, colour offset)]``: each candidate's mean |ΔRGB| to the ring
    around what is still to fill (after matching its mean colour), minus a bonus for the share
    it can cover; candidates that cover too little are left out."""
    h, w = remaining.shape
    ry, rx = np.nonzero((mk.dilate(remaining, ring) > 0) & ~remaining & known)
    if len(ry) < 8:
        ry, rx = np.nonzero((mk.dilate(remaining, ring) > 0) & ~remaining)
    qy, qx = np.nonzero(remaining)
    step = max(1, len(qy) // 4000)             # coverage estimated on a subsample
    qy_s, qx_s = qy[::step], qx[::step]
    ring_vals = out[ry, rx]
    scored = []
    for ci, (si, dy, dx) in enumerate(cands):
        bg = sources[si].background
        ok, _ = shift_take(bg, qy_s, qx_s, dy, dx)
        ok &= bg[np.clip(qy_s + dy, 0, h - 1), np.clip(qx_s + dx, 0, w - 1)]
        cover = float(ok.mean())
        if cover * len(qy) < min_px:
            continue
        rok, rvals = shift_take(imgs[si], ry, rx, dy, dx)
        rok &= bg[np.clip(ry + dy, 0, h - 1), np.clip(rx + dx, 0, w - 1)]
        if rok.sum() < max(4, 0.2 * len(ry)):
            cost, col = 40.0, np.zeros(3, np.float32)
        else:
            diff = ring_vals[rok] - rvals[rok]
            col = np.clip(diff.mean(0), -25, 25)
            cost = float(np.abs(diff - col).mean() + 0.25 * np.abs(col).mean())
        scored.append((cost - 6.0 * cover, ci, col))
    scored.sort(key=lambda t: t[0])
    return scored


def fill_background(target: np.ndarray, region: np.ndarray, structure: np.ndarray,
                    sources: Sequence[Source], rng: np.random.Generator,
                    offsets: Sequence[tuple[int, int, float]] = (), ring: int = 4,
                    explore: float = 0.0, max_pieces: int = 10, periodic: bool = True) -> FillResult:
    """``region`` (``H×W bool``) of ``target`` replaced by background copied from ``sources`` at
    ``offsets`` (plus the zero offset for registered goods and seeded random far offsets).

    Piece by piece: every (source, shift) candidate is scored on the ring around what is still
    to fill — the target's background there and the pieces already placed — by the mean |ΔRGB|
    after matching its mean colour, minus a bonus for the share it can cover; the best one
    (the first piece: seeded among the near-best, ``explore`` (0..1) widening that choice up to
    any candidate — a texture copied from a random place) fills every pixel it can, with its
    colour offset. What no candidate covers is inpainted (Telea). A periodic background is first
    filled with the median of its periodic copies (:func:`periodic_median`) unless ``periodic``
    is off (a texture replaced by itself from elsewhere: the copy should not be the same)."""
    out = target.astype(np.float32).copy()
    if not region.any():
        return FillResult(out, 0.0, 0, np.full(region.shape, -1, np.int32))
    h, w = region.shape
    ys, xs = np.nonzero(region)
    span = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
    cands = _candidates(sources, offsets, rng, span)
    imgs = [src.image.astype(np.float32) for src in sources]
    known = ~region & ~structure                  # what the ring may compare against
    remaining = region.copy()
    labels = np.full((h, w), -1, np.int32)
    # 1. a periodic background: the robust median of its nearest periodic copies
    med, ok_med = periodic_median(region, sources, imgs, offsets) if periodic else (None, None)
    if ok_med is not None and ok_med.any():
        out[ys[ok_med], xs[ok_med]] = med[ok_med]
        remaining[ys[ok_med], xs[ok_med]] = False
        known[ys[ok_med], xs[ok_med]] = True
        labels[ys[ok_med], xs[ok_med]] = PERIODIC
    min_px = max(6, int(0.01 * len(ys)))
    pieces, first = 0, True
    used = []
    # 2. pieces copied at one shift each
    while remaining.any() and cands and pieces < max_pieces:
        scored = _score(cands, sources, imgs, out, remaining, known, ring, min_px)
        if not scored:
            break
        j = 0
        if first:
            best = scored[0][0]
            tol = abs(best) * 0.1 + 1.0 + 40.0 * explore
            near = [k for k, t in enumerate(scored) if t[0] <= best + tol]
            j = near[int(rng.integers(len(near)))]
            first = False
        _, ci, col = scored[j]
        si, dy, dx = cands.pop(ci)
        qy, qx = np.nonzero(remaining)
        py, px = qy + dy, qx + dx
        ok = (py >= 0) & (py < h) & (px >= 0) & (px < w)
        ok[ok] &= sources[si].background[py[ok], px[ok]]
        if ok.sum() < min_px:
            continue
        out[qy[ok], qx[ok]] = imgs[si][py[ok], px[ok]] + col
        remaining[qy[ok], qx[ok]] = False
        known[qy[ok], qx[ok]] = True
        labels[qy[ok], qx[ok]] = pieces
        used.append((si, dy, dx))
        pieces += 1
    # 3. what nothing covers
    left = float(remaining.sum()) / len(ys)
    if remaining.any():
        out = inpaint(out, remaining, structure & ~region | (structure & remaining))
    return FillResult(np.clip(out, 0, 255), left, pieces, labels, used)


__all__ = ["Source", "sources_for", "fill_background", "FillResult", "inpaint", "periodic_median",
           "shift_take", "PERIODIC"]
