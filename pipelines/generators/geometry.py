"""Mask geometry for laying a donor defect onto a painted mask: moments, the dihedral group, the
affine candidates and the smooth displacement field (used by cutpaste and defect-transfer)."""
from __future__ import annotations

import math

import cv2
import numpy as np

DIHEDRAL = tuple(np.array(m, float) for m in (
    [[1, 0], [0, 1]], [[-1, 0], [0, 1]], [[1, 0], [0, -1]], [[-1, 0], [0, -1]],
    [[0, 1], [1, 0]], [[0, -1], [1, 0]], [[0, 1], [-1, 0]], [[0, -1], [-1, 0]]))
MAX_ANISO = 2.0              # per-axis scales within [g / 2, g · 2] of their geometric mean g
FIELD_ITERS = 50
FIELD_MAX_SIDE = 192         # the displacement field is computed at most this large


def sdf(m: np.ndarray) -> np.ndarray:
    """Signed distance (px, float32): negative inside ``m`` (bool, neither empty nor full),
    positive outside."""
    m8 = m.astype(np.uint8)
    outside = cv2.distanceTransform(1 - m8, cv2.DIST_L2, 5)
    inside = cv2.distanceTransform(m8, cv2.DIST_L2, 5)
    return (outside - inside).astype(np.float32)


def moments(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(centroid (x, y), R 2×2 with the major / minor axis as columns, σ (major, minor))`` of
    a non-empty boolean mask; each pixel counts as a unit square (a 1-px line has σ_minor > 0)."""
    ys, xs = np.nonzero(m)
    pts = np.stack([xs, ys]).astype(np.float64)
    c = pts.mean(axis=1)
    cov = np.cov(pts) if xs.size > 1 else np.zeros((2, 2))
    ev, vec = np.linalg.eigh(cov + np.eye(2) / 12.0)
    return c, vec[:, ::-1].copy(), np.sqrt(ev[::-1])


def rot(a: float) -> np.ndarray:
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def candidate_affines(target: np.ndarray, donor: np.ndarray, angle: float = 0.0,
                      scale: float = 1.0) -> list[np.ndarray]:
    """Eight ``2×3`` maps target coords → donor coords (``cv2.WARP_INVERSE_MAP`` convention): the
    target's principal frame onto the donor's through each signed axis permutation, per-axis
    scales ``σ_donor / σ_target`` (each within ×/÷ ``min(2, √(donor σ ratio))`` of their geometric
    mean: a stroke may be stretched across, a round texture patch stays nearly isotropic), then
    ``angle`` (rad) / ``scale`` jitter about the donor's centroid."""
    ct, Rt, st = moments(target)
    cd, Rd, sd = moments(donor)
    # a stroke may be stretched across (its texture runs along it); a round donor is a texture
    # patch that squashing would streak: its anisotropy cap is √(its own elongation)
    cap = float(np.clip(math.sqrt(sd[0] / sd[1]), 1.0, MAX_ANISO))
    out = []
    for P in DIHEDRAL:
        src = np.argmax(np.abs(P), axis=1)          # donor axis i ← target axis src[i]
        s = sd / st[src]
        g = math.sqrt(s[0] * s[1])
        s = np.clip(s, g / cap, g * cap)
        lin = Rd @ rot(angle) @ np.diag(s * scale) @ P @ Rt.T
        out.append(np.hstack([lin, (cd - lin @ ct)[:, None]]))
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


_DISC5 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))


def best_affine(target: np.ndarray, donor_mask: np.ndarray, affines: list[np.ndarray],
                rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """The candidate whose warped donor mask best overlaps ``target`` (both dilated by 2 px so
    thin strokes count), near-ties (within 0.05 IoU) broken by ``rng``; ``(affine, IoU)``."""
    h, w = target.shape
    t = cv2.dilate(target.astype(np.uint8), _DISC5) > 0
    d = cv2.dilate(donor_mask.astype(np.uint8), _DISC5)
    scores = np.array([iou(cv2.warpAffine(d, a, (w, h), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP) > 0, t)
                       for a in affines])
    good = np.flatnonzero(scores >= scores.max() - 0.05)
    k = int(good[int(rng.integers(len(good)))])
    return affines[k], float(scores[k])


def displacement_field(target: np.ndarray, warped: np.ndarray, size: float,
                       iters: int = FIELD_ITERS, sigma_frac: float = 0.06, step: float = 0.5
                       ) -> np.ndarray:
    """``H×W×2 float32`` field ``u`` (x, y) with ``warped(x + u(x)) ≈ target(x)`` (boolean
    ``H×W`` masks; ``size`` ≈ the target's length in px).

    Demons-style iterations on signed distance functions ``φ`` (negative inside): each pixel
    moves along ``−∇φ_W`` by ``step ×`` the distance mismatch ``φ_W(x + u) − φ_T(x)`` (clipped to
    2 px per iteration, weighted to a band around the target), then ``u`` is smoothed by a
    Gaussian of σ = ``sigma_frac × size`` (1..8 px) and limited to 35 % of ``size``. Computed at
    most :data:`FIELD_MAX_SIDE` px large and upsampled."""
    h, w = target.shape
    if not warped.any() or not target.any() or warped.all() or target.all():
        return np.zeros((h, w, 2), np.float32)         # no outline to align
    f = min(1.0, FIELD_MAX_SIDE / max(h, w))
    if f < 1.0:
        size_lo = (max(4, round(w * f)), max(4, round(h * f)))
        t = cv2.resize(target.astype(np.uint8), size_lo, interpolation=cv2.INTER_NEAREST) > 0
        wm = cv2.resize(warped.astype(np.uint8), size_lo, interpolation=cv2.INTER_NEAREST) > 0
        if t.any() and wm.any():
            u = displacement_field(t, wm, size * f, iters, sigma_frac, step)
            u = cv2.resize(u, (w, h), interpolation=cv2.INTER_LINEAR) / f
            return u.astype(np.float32)
    phi_t, phi_w = sdf(target), sdf(warped)
    gy, gx = np.gradient(phi_w)
    gx, gy = gx.astype(np.float32), gy.astype(np.float32)
    sigma = float(np.clip(sigma_frac * size, 1.0, 8.0))
    band = float(np.clip(0.25 * size, 4.0, 40.0))
    weight = np.clip(1.5 - np.abs(phi_t) / band, 0.0, 1.0).astype(np.float32)
    max_u = float(np.clip(0.35 * size, 3.0, 60.0))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u = np.zeros((h, w, 2), np.float32)
    for _ in range(iters):
        mx, my = xx + u[..., 0], yy + u[..., 1]
        pw = cv2.remap(phi_w, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        gxw = cv2.remap(gx, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        gyw = cv2.remap(gy, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        move = -step * (pw - phi_t) / np.maximum(gxw * gxw + gyw * gyw, 0.25) * weight
        u[..., 0] += np.clip(move * gxw, -2.0, 2.0)
        u[..., 1] += np.clip(move * gyw, -2.0, 2.0)
        u = cv2.GaussianBlur(u, (0, 0), sigma)
        norm = np.sqrt((u * u).sum(axis=2, keepdims=True))
        u *= np.minimum(1.0, max_u / np.maximum(norm, 1e-6))
    return u


__all__ = ["DIHEDRAL", "sdf", "moments", "rot", "candidate_affines", "iou", "best_affine", "displacement_field"]
