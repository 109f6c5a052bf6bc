"""Stroke geometry and cross-section profiles: what the ``stroke`` generator renders along a mask's
skeleton, and how cut-paste and defect-transfer lay a donor along an elongated painted mask.

Geometry (:func:`skeleton_of`, :func:`nearest`)
------------------------------------------------
A mask (``H×W`` bool) is reduced to its skeleton (scikit-image's ``skeletonize``). Every skeleton
pixel ``q`` carries

- ``width`` — the mask's local *half*-width there (the inside distance transform minus half a
  pixel, smoothed along the skeleton; ≥ 0.5 px): a 3 px painted line has 1.5, a wide blob the
  distance to its outline, so a wide mask is a stroke of its own local width;
- ``normal`` — the unit normal (the dominant gradient direction of the blurred skeleton, a
  structure tensor; its sign is arbitrary — everything below is invariant to flipping it);
- ``ends`` — the geodesic distance along the skeleton to its nearest end point (``inf`` on a
  closed loop), and ``length`` — the skeleton length of its connected part.

A pixel ``p`` of the window is described by its nearest skeleton pixel ``q`` (an exact Euclidean
distance transform with indices) and its signed, normalised offset ``t = ±|p − q| / width(q)``
(the sign: the side of the normal ``p`` lies on). ``|t| ≤ 1`` is the mask, ``|t| ≈ 1`` its outline.

Profiles (:class:`Profile`, :func:`measure_profile`, :func:`default_profile`)
-----------------------------------------------------------------------------
A cross-section profile is what a thin defect does to the surface as a function of ``t``, as
the relative deviation from the local background (:func:`pipelines.transfer.deviation`'s first
four channels): ``log_l = log((L + 1) / (L_bg + 1))`` (CIE LAB lightness as a ratio), ``log_k``
(the chroma change along the background's hue, a log ratio) and ``rest_a``, ``rest_b`` (the
rest of the a/b change: a hue the defect brings). It has two parts:

- ``sym`` ``[bins × 4]`` — the even part, a function of ``|t|`` (a dark core, its lips);
- ``anti`` ``[bins × 2]`` — the odd part of ``log_l`` as a vector: the value at ``t`` adds
  ``sign(t) · (n · anti(|t|))`` for the normal ``n``. A groove lit from one side has a bright
  wall facing the light and a shadowed one facing away; the vector says which way the light
  comes from (fitted by least squares over the reference's normals, ridge-shrunk to 0 when the
  reference's orientations cannot tell).

:func:`measure_profile` measures one on a reference defect: its background under the defect is
inpainted (:func:`pipelines.transfer.background`), the deviation of every
pixel within ``dilate(mask, halo)`` is binned by ``|t|`` (skeleton end caps left out) and the
per-bin median kept; ``along`` is the robust relative variation of the core along the skeleton,
``branching`` the skeleton's branch points per 100 px, and the bounds (``log_l_range``, ``L_hi``,
``C_hi``) the reference's own range — a rendered defect never gets brighter, more saturated or
more extreme than its references. :func:`profiles_for` caches them per donor (BLAKE2 hash of the
image and mask bytes; a donor set is the tuple of its donors' hashes).
:func:`default_profile` is the profile of a defect style (:data:`pipelines.masks.STYLES`) for a
type without references.

Strips (:func:`strip_of`, :func:`strip_map`)
--------------------------------------------
The main path of an elongated mask (the longest geodesic path of its skeleton's largest part),
smoothed, with its arc length, tangents, normals and half-widths. :func:`strip_map` maps every
point of a target window to a donor's window along the two strips: arc length onto arc length
(ends onto ends), the normalised offset across the mask onto the same offset across the donor's
(outside the masks at a gentler scale), so a donor defect is laid along the painted stroke
instead of being pasted with its own outline.
"""
from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np

T_MAX = 2.6                               # |t| beyond which a profile is 0
BIN_EDGES = np.linspace(0.0, 2.8, 15)     # |t| bins of 0.2
BIN_CENTRES = 0.5 * (BIN_EDGES[:-1] + BIN_EDGES[1:])
N_BINS = BIN_CENTRES.size
CHANNELS = ("log_l", "log_k", "rest_a", "rest_b")
_OFFS = ((0, 1), (1, 0), (1, 1), (1, -1))          # half of the 8-neighbourhood (dy, dx)


# --------------------------------------------------------------------------------------------
# Skeleton geometry
# --------------------------------------------------------------------------------------------
@dataclass
class Skeleton:
    """A mask's skeleton with per-pixel attributes (``H×W`` arrays; meaningful on ``skel``)."""
    skel: np.ndarray            # bool
    width: np.ndarray           # float32 half-width (px)
    normal: np.ndarray          # float32 [H x W x 2] unit normal (x, y), sign arbitrary
    ends: np.ndarray            # float32 geodesic px to the nearest end point (inf: a loop)
    length: np.ndarray          # float32 skeleton length (px) of the connected part

    @property
    def total_length(self) -> float:
        return float(self.skel.sum())


def _graph(skel: np.ndarray):
    """Sparse 8-neighbour graph of the skeleton pixels (weights 1 / √2) and their coordinates."""
    from scipy import sparse
    h, w = skel.shape
    ys, xs = np.nonzero(skel)
    idx = -np.ones((h, w), np.int64)
    idx[ys, xs] = np.arange(ys.size)
    rows, cols, wts = [], [], []
    for dy, dx in _OFFS:
        ny, nx = ys + dy, xs + dx
        ok = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        ok[ok] = skel[ny[ok], nx[ok]]
        rows.append(idx[ys[ok], xs[ok]])
        cols.append(idx[ny[ok], nx[ok]])
        wts.append(np.full(int(ok.sum()), math.hypot(dy, dx)))
    r, c, wt = np.concatenate(rows), np.concatenate(cols), np.concatenate(wts)
    n = ys.size
    g = sparse.csr_matrix((np.concatenate([wt, wt]), (np.concatenate([r, c]), np.concatenate([c, r]))),
                          shape=(n, n))
    return g, ys, xs


def _neighbours(skel: np.ndarray) -> np.ndarray:
    k = np.ones((3, 3), np.float32)
    k[1, 1] = 0
    return cv2.filter2D(skel.astype(np.float32), -1, k, borderType=cv2.BORDER_CONSTANT)


def _smooth_on(values: np.ndarray, where: np.ndarray, sigma: float) -> np.ndarray:
    """Normalised Gaussian smoothing of ``values`` over the pixels ``where`` (elsewhere: 0)."""
    wf = where.astype(np.float32)
    num = cv2.GaussianBlur(values.astype(np.float32) * wf, (0, 0), sigma)
    den = cv2.GaussianBlur(wf, (0, 0), sigma)
    return np.where(where, num / np.maximum(den, 1e-6), 0.0).astype(np.float32)


def normals(skel: np.ndarray) -> np.ndarray:
    """Unit normals ``[H x W x 2]`` (x, y) of a 1-px skeleton from the structure tensor of its
    blurred image (gradients point across a line)."""
    b = cv2.GaussianBlur(skel.astype(np.float32), (0, 0), 1.0)
    gx = cv2.Sobel(b, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(b, cv2.CV_32F, 0, 1, ksize=3)
    jxx = cv2.GaussianBlur(gx * gx, (0, 0), 1.5)
    jxy = cv2.GaussianBlur(gx * gy, (0, 0), 1.5)
    jyy = cv2.GaussianBlur(gy * gy, (0, 0), 1.5)
    theta = 0.5 * np.arctan2(2.0 * jxy, jxx - jyy)
    return np.stack([np.cos(theta), np.sin(theta)], -1).astype(np.float32)


def skeleton_of(mask: np.ndarray) -> Skeleton:
    """The :class:`Skeleton` of a boolean mask (never empty for a non-empty mask: a mask whose
    skeleton vanishes keeps its centre pixel)."""
    from scipy.sparse.csgraph import connected_components, dijkstra
    from skimage.morphology import skeletonize
    m = np.asarray(mask) > 0
    h, w = m.shape
    skel = skeletonize(m) if m.any() else np.zeros((h, w), bool)
    if m.any() and not skel.any():
        ys, xs = np.nonzero(m)
        skel[ys[ys.size // 2], xs[xs.size // 2]] = True
    inside = cv2.distanceTransform(np.pad(m, 1).astype(np.uint8), cv2.DIST_L2,
                                   cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    width = np.maximum(inside - 0.5, 0.5).astype(np.float32)
    width = np.maximum(_smooth_on(width, skel, 1.5), 0.5) * skel
    ends = np.full((h, w), np.inf, np.float32)
    length = np.zeros((h, w), np.float32)
    if skel.any():
        g, ys, xs = _graph(skel)
        ncomp, labels = connected_components(g, directed=False)
        sizes = np.bincount(labels, minlength=ncomp).astype(np.float32)
        length[ys, xs] = sizes[labels]
        tips = np.flatnonzero(_neighbours(skel)[ys, xs] <= 1)
        if tips.size:
            d = dijkstra(g, directed=False, indices=tips, min_only=True)
            ends[ys, xs] = d.astype(np.float32)
    return Skeleton(skel, width.astype(np.float32), normals(skel), ends, length)


def nearest(skel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(distance, iy, ix)``: for every pixel, the Euclidean distance to its nearest skeleton
    pixel and that pixel's coordinates."""
    from scipy import ndimage as ndi
    d, (iy, ix) = ndi.distance_transform_edt(~skel, return_indices=True)
    return d.astype(np.float32), iy, ix


def offsets(sk: Skeleton, skel: np.ndarray | None = None):
    """``(t, n, iy, ix)`` for every window pixel: its signed normalised offset from its nearest
    pixel of ``skel`` (default ``sk.skel``; widths and normals from ``sk``), that pixel's normal
    ``[H x W x 2]`` and coordinates."""
    skel = sk.skel if skel is None else skel
    h, w = skel.shape
    d, iy, ix = nearest(skel)
    n = sk.normal[iy, ix]
    yy, xx = np.mgrid[0:h, 0:w]
    side = (xx - ix) * n[..., 0] + (yy - iy) * n[..., 1]
    sign = np.where(side < 0, -1.0, 1.0).astype(np.float32)
    t = sign * d / np.maximum(sk.width[iy, ix], 0.5)
    return t.astype(np.float32), n, iy, ix


def branch_rate(mask: np.ndarray) -> float:
    """Branch points per 100 px of a mask's skeleton (:func:`pipelines.shapes.measure`)."""
    from pipelines.shapes import measure
    m = np.asarray(mask) > 0
    if not m.any():
        return 0.0
    st = measure(m)
    return 100.0 * st["branch_points"] / max(st["skeleton_length"], 1.0)


# --------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """A cross-section profile (see the module docstring)."""
    sym: np.ndarray                 # [N_BINS x 4] even part (log_l, log_k, rest_a, rest_b) at |t|
    anti: np.ndarray                # [N_BINS x 2] odd part of log_l, a vector (x, y)
    along: float                    # robust relative variation of the core along the skeleton
    branching: float                # branch points per 100 px of skeleton
    width: float                    # median half-width (px) of the reference mask
    log_l_range: tuple[float, float]
    L_hi: float | None              # brightest L of the reference region (None: a default)
    C_hi: float | None              # highest chroma there
    source: str

    def at(self, t: np.ndarray, n: np.ndarray) -> np.ndarray:
        """The deviation ``[... x 4]`` at offsets ``t`` with normals ``n [... x 2]``."""
        a = np.abs(t)
        xs = np.concatenate([[0.0], BIN_CENTRES, [T_MAX + 0.2]])
        out = np.empty(t.shape + (4,), np.float32)
        for c in range(4):
            ys = np.concatenate([[self.sym[0, c]], self.sym[:, c], [0.0]])
            out[..., c] = np.interp(a, xs, ys)
        ax = np.interp(a, xs, np.concatenate([[0.0], self.anti[:, 0], [0.0]]))
        ay = np.interp(a, xs, np.concatenate([[0.0], self.anti[:, 1], [0.0]]))
        out[..., 0] += np.sign(t) * (n[..., 0] * ax + n[..., 1] * ay)
        out[a >= T_MAX] = 0.0
        return out

    def core_sign(self) -> float:
        """+1 for a bright core, −1 for a dark one (the sign of the deviation at the centre)."""
        c = self.sym[:3, 0].mean()
        return 1.0 if c > 0 else -1.0

    def scaled(self, contrast: float = 1.0, rim: float = 1.0) -> "Profile":
        """``contrast`` scales the whole deviation; ``rim`` the lobes of the opposite sign to the
        core (lips, lit rims, edge shadows) and the odd, light-direction part."""
        sym = self.sym.copy()
        opposite = np.sign(sym[:, 0]) == -self.core_sign()
        sym[opposite, 0] *= rim
        lo, hi = self.log_l_range
        return Profile(sym * contrast, self.anti * rim * contrast, self.along, self.branching,
                       self.width, (lo * max(contrast, 1.0), hi * max(contrast, 1.0)),
                       self.L_hi, self.C_hi, self.source)


def _bump(a, centre, sigma):
    return np.exp(-((a - centre) / sigma) ** 2)


def _fall(a, lo, hi):
    x = np.clip((a - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    return 1.0 - x * x * (3.0 - 2.0 * x)


_MARK_TINTS = ((2.0, 7.0), (0.5, 2.0), (9.0, 14.0), (-1.0, 12.0))   # Δa, Δb: brown, oil, rust, yellowish


def default_profile(style: str, rng: np.random.Generator | None = None, spread: float = 1.0) -> Profile:
    """The profile of a defect ``style`` (:data:`pipelines.masks.STYLES`) without references:
    ``crack`` a dark narrow core with faint lips and a lit wall; ``scratch`` a bright (60 %) or
    dark thin line; ``broken`` a cut: a flat dark groove with a bright rim; ``blob`` a darker
    tinted mark (brown, oil, rust or yellowish); ``color`` a hue shift. ``rng`` (None: the
    nominal profile) draws, in this order, the depth (×0.7..1.3) and the core's width
    (×0.8..1.25) — both variations scaled by ``spread`` — then the scratch's polarity, the mark's
    tint or the colour's hue."""
    a = BIN_CENTRES
    depth, core = (1.0, 1.0) if rng is None else (1.0 + spread * (rng.uniform(0.7, 1.3) - 1.0),
                                                  1.0 + spread * (rng.uniform(0.8, 1.25) - 1.0))
    ac = a / core                                   # the core's shape, widened or narrowed
    sym = np.zeros((N_BINS, 4))
    anti = np.zeros((N_BINS, 2))
    along, branching = 0.3, 0.0
    if style == "crack":
        sym[:, 0] = -1.0 * _bump(ac, 0.0, 0.5) + 0.08 * _bump(a, 1.15, 0.3)
        sym[:, 1] = 0.5 * np.minimum(sym[:, 0], 0.0)
        anti[:, 1] = -0.10 * a * _bump(a, 0.0, 0.9)
        branching = 2.0
    elif style == "scratch":
        bright = rng is None or rng.random() < 0.6
        if bright:
            sym[:, 0] = 0.45 * _bump(ac, 0.0, 0.55) - 0.05 * _bump(a, 1.2, 0.3)
            sym[:, 1] = -0.6 * np.maximum(sym[:, 0], 0.0)
        else:
            sym[:, 0] = -0.55 * _bump(ac, 0.0, 0.5) + 0.06 * _bump(a, 1.15, 0.3)
            sym[:, 1] = 0.4 * np.minimum(sym[:, 0], 0.0)
        along = 0.2
    elif style == "broken":
        sym[:, 0] = -0.8 * _fall(ac, 0.55, 1.0) + 0.15 * _bump(a, 1.05, 0.2)
        sym[:, 1] = 0.4 * np.minimum(sym[:, 0], 0.0)
        anti[:, 1] = -0.08 * _bump(a, 0.9, 0.3)
        along = 0.2
    elif style == "color":
        hue = rng.uniform(0, 2 * np.pi) if rng is not None else 0.0
        shape = _fall(ac, 0.5, 1.3)
        sym[:, 0] = -0.04 * shape
        sym[:, 2], sym[:, 3] = 14.0 * math.cos(hue) * shape, 14.0 * math.sin(hue) * shape
    else:                                            # blob: a tinted mark along the stroke
        da, db = _MARK_TINTS[int(rng.integers(len(_MARK_TINTS)))] if rng is not None else _MARK_TINTS[0]
        shape = _fall(ac, 0.4, 1.1)
        sym[:, 0] = -0.35 * shape
        sym[:, 1] = 0.2 * shape
        sym[:, 2], sym[:, 3] = da * shape, db * shape
        along = 0.35
    sym *= depth
    anti *= depth
    lo, hi = float(min(sym[:, 0].min(), 0.0)), float(max(sym[:, 0].max(), 0.0))
    return Profile(sym.astype(np.float32), anti.astype(np.float32), along, branching, 1.5,
                   (1.2 * lo, 1.2 * hi), None, None, f"default:{style}")


def measure_profile(image: np.ndarray, mask: np.ndarray) -> Profile:
    """The cross-section :class:`Profile` of one reference defect (``image`` ``H×W×3`` uint8,
    ``mask`` ``H×W`` bool, non-empty), measured perpendicular to its skeleton relative to its
    inpainted local background (see the module docstring)."""
    from pipelines import masks as mk
    from pipelines.generators import appearance as T
    m = np.asarray(mask) > 0
    r = T.halo(m)
    ys, xs = T.window_of(m, 3 * r + 8)
    rgb, mw = image[ys, xs], m[ys, xs]
    hole = mk.dilate(mw.astype(np.uint8) * 255, r) > 0
    bg = T.background(rgb, hole, smooth=max(1.0, r / 2))
    lab, lab_bg = T.to_lab(rgb), T.to_lab(bg)
    dev = T.deviation(lab, lab_bg, 8.0)[..., :4]
    sk = skeleton_of(mw)
    t, n, iy, ix = offsets(sk)
    a = np.abs(t)
    use = hole & (a < BIN_EDGES[-1])
    caps = sk.ends[iy, ix] < sk.width[iy, ix]
    if (use & ~caps).sum() >= 0.3 * use.sum():
        use &= ~caps
    b = np.clip(np.digitize(a[use], BIN_EDGES) - 1, 0, N_BINS - 1)
    vals = dev[use]
    sym = np.zeros((N_BINS, 4), np.float32)
    filled = np.zeros(N_BINS, bool)
    for k in range(N_BINS):
        sel = b == k
        if sel.sum() >= 3:
            sym[k] = np.median(vals[sel], axis=0)
            filled[k] = True
    if not filled.any():
        sym[:] = 0.0
    else:
        for c in range(4):                      # fill empty bins by interpolation (0 far out)
            xs_f = np.concatenate([BIN_CENTRES[filled], [T_MAX + 0.2]])
            ys_f = np.concatenate([sym[filled, c], [0.0]])
            sym[~filled, c] = np.interp(BIN_CENTRES[~filled], xs_f, ys_f)
    # the odd part of log_l: y − sym(|t|) ≈ sign(t) · n · anti(|t|), ridge least squares per bin
    resid = vals[:, 0] - np.interp(a[use], BIN_CENTRES, sym[:, 0])
    X = np.sign(t[use])[:, None] * n[use]
    anti = np.zeros((N_BINS, 2), np.float32)
    for k in range(N_BINS):
        sel = b == k
        if sel.sum() >= 6:
            xk = X[sel]
            A = xk.T @ xk + 0.05 * sel.sum() * np.eye(2)
            anti[k] = np.linalg.solve(A, xk.T @ resid[sel])
    # along: the core's robust relative variation between skeleton pixels
    core = use & (a < 0.6)
    along = 0.3
    if core.sum() >= 8:
        key = (iy[core] * mw.shape[1] + ix[core]).astype(np.int64)
        uniq, inv = np.unique(key, return_inverse=True)
        per_q = np.bincount(inv, dev[core, 0]) / np.bincount(inv)
        med = float(np.median(per_q))
        if abs(med) > 0.02 and per_q.size >= 4:
            along = float(np.clip(1.4826 * np.median(np.abs(per_q - med)) / abs(med), 0.05, 0.8))
    Lr = lab[hole, 0]
    chroma = np.sqrt((lab[hole, 1:] ** 2).sum(-1))
    lo, hi = np.percentile(dev[hole, 0], [0.5, 99.5])
    return Profile(sym, anti, along, min(branch_rate(mw), 4.0),
                   float(np.median(sk.width[sk.skel])), (float(min(lo, 0.0)), float(max(hi, 0.0))),
                   float(np.percentile(Lr, 99.5)), float(np.percentile(chroma, 99.5)), "reference")


def donor_key(image: np.ndarray, mask: np.ndarray) -> str:
    """BLAKE2 hash of a donor's image and mask bytes (and shapes)."""
    h = hashlib.blake2b(digest_size=16)
    for arr in (np.ascontiguousarray(image), np.ascontiguousarray(np.asarray(mask) > 0)):
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def mask_key(mask: np.ndarray) -> str:
    """BLAKE2 hash of a mask (as bool) and its shape."""
    m = np.ascontiguousarray(np.asarray(mask) > 0)
    return hashlib.blake2b(str(m.shape).encode() + m.tobytes(), digest_size=16).hexdigest()


_CACHE: "OrderedDict[str, Any]" = OrderedDict()
_CACHE_MAX = 256
_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget every cached profile, donor and strip (benchmarks: time a first call)."""
    with _LOCK:
        _CACHE.clear()


def cached(kind: str, key: str, make):
    """``make()`` cached under ``(kind, key)`` (LRU, :data:`_CACHE_MAX` entries, thread-safe)."""
    k = f"{kind}:{key}"
    with _LOCK:
        if k in _CACHE:
            _CACHE.move_to_end(k)
            return _CACHE[k]
    value = make()
    with _LOCK:
        _CACHE[k] = value
        while len(_CACHE) > _CACHE_MAX:
            _CACHE.popitem(last=False)
    return value


def profiles_for(donors: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[Profile]:
    """The measured profile of every donor ``(image, mask bool)``, cached per donor hash (a
    donor set is the tuple of its donors' hashes)."""
    return [cached("profile", donor_key(img, m), lambda img=img, m=m: measure_profile(img, m))
            for img, m in donors]


def mix(a: Profile, b: Profile, w: float) -> Profile:
    """``(1 − w)·a + w·b`` (bounds: the wider of the two)."""
    lo = min(a.log_l_range[0], b.log_l_range[0])
    hi = max(a.log_l_range[1], b.log_l_range[1])
    L_hi = None if a.L_hi is None or b.L_hi is None else max(a.L_hi, b.L_hi)
    C_hi = None if a.C_hi is None or b.C_hi is None else max(a.C_hi, b.C_hi)
    return Profile((1 - w) * a.sym + w * b.sym, (1 - w) * a.anti + w * b.anti,
                   (1 - w) * a.along + w * b.along, (1 - w) * a.branching + w * b.branching,
                   (1 - w) * a.width + w * b.width, (lo, hi), L_hi, C_hi, a.source)


# --------------------------------------------------------------------------------------------
# Re-lighting with bounds (shared by stroke and defect-transfer)
# --------------------------------------------------------------------------------------------
def soft_ceiling(x: np.ndarray, base: np.ndarray, ceiling: np.ndarray) -> np.ndarray:
    """``x`` where it is ≤ ``base``; above it compressed smoothly towards ``ceiling``:
    ``base + (c − base)·tanh((x − base) / (c − base))`` with ``c = max(ceiling, base)`` — the
    identity for small increases, never above the ceiling, never a flat clipped plateau."""
    c = np.maximum(ceiling, base)
    room = np.maximum(c - base, 1e-6)
    up = base + room * np.tanh(np.maximum(x - base, 0.0) / room)
    return np.where(x > base, np.where(c > base, up, base), x).astype(np.float32)


def relight(lab: np.ndarray, dev: np.ndarray, L_hi: float | None, C_hi: float | None,
            headroom: float = 0.85) -> np.ndarray:
    """Apply a deviation ``[H x W x 4]`` (log_l, log_k, rest_a, rest_b) to a target LAB image by
    ratio (``L' = (L + 1)·e^log_l − 1``, ``ab' = ab·e^log_k + rest``), with highlights bounded:
    a brightening never exceeds ``max(L, L_hi)`` (the reference's own brightest L; without one,
    ``L + headroom·(100 − L)``) and a chroma increase never exceeds ``max(C, C_hi)``
    (:func:`soft_ceiling`). Returns LAB (not yet gamut-mapped)."""
    L = np.maximum(lab[..., 0], 0.0).astype(np.float32)
    ratio = (L + 1.0) * np.exp(dev[..., 0]) - 1.0
    ceil_L = L + headroom * (100.0 - L) if L_hi is None else np.full_like(L, min(float(L_hi), 99.5))
    ceil_L = np.minimum(ceil_L, 99.5)
    out = np.empty(lab.shape, np.float32)
    out[..., 0] = np.clip(soft_ceiling(ratio, L, ceil_L), 0.0, 100.0)
    ab = lab[..., 1:].astype(np.float32)
    new = ab * np.exp(dev[..., 1:2]) + dev[..., 2:4]
    C = np.sqrt((ab ** 2).sum(-1))
    Cn = np.sqrt((new ** 2).sum(-1))
    ceil_C = np.maximum(C, C_hi if C_hi is not None else C + 20.0)
    Cb = soft_ceiling(Cn, C, ceil_C)
    out[..., 1:] = new * (Cb / np.maximum(Cn, 1e-6))[..., None]
    return out


def lab_to_rgb_float(lab: np.ndarray) -> np.ndarray:
    """LAB → float RGB 0..255, gamut-mapped (chroma shrunk at constant L and hue,
    :func:`pipelines.color.fit_to_srgb`) rather than clipped per channel."""
    import warnings
    from skimage import color as skcolor
    from pipelines.color import fit_to_srgb
    fitted = fit_to_srgb(lab.astype(np.float64).reshape(-1, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rgb = skcolor.lab2rgb(fitted.reshape(-1, 1, 3)).reshape(lab.shape)
    return np.clip(rgb * 255.0, 0.0, 255.0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Strips: elongated masks parametrised along their main path
# --------------------------------------------------------------------------------------------
@dataclass
class Strip:
    """The main path of an elongated mask: ``pts [K x 2]`` (x, y) 1 px apart, unit ``tangent``
    and ``normal`` ``[K x 2]``, ``arc [K]`` (px from the start), half-``width [K]`` (px)."""
    pts: np.ndarray
    tangent: np.ndarray
    normal: np.ndarray
    arc: np.ndarray
    width: np.ndarray

    @property
    def length(self) -> float:
        return float(self.arc[-1])

    @property
    def mean_width(self) -> float:
        return float(np.mean(self.width))

    @property
    def elongation(self) -> float:
        """Path length / full width."""
        return self.length / max(2.0 * self.mean_width, 1.0)


def elongation(mask: np.ndarray) -> float:
    """A mask's length over its widest width (:mod:`pipelines.shapes`' ``extent / max_width``:
    4 √λ1 of its pixel coordinates over twice its largest inside distance) — ≈ 58 for a 3 px
    line 150 px long, ≈ 1.2 for a disc; what decides whether a mask is a stroke."""
    from pipelines.shapes import measure
    m = np.asarray(mask) > 0
    if not m.any():
        return 0.0
    st = measure(m)
    return st["extent"] / max(st["max_width"], 1.0)


def _main_path(skel: np.ndarray) -> np.ndarray:
    """Pixel coordinates ``[K x 2]`` (x, y) of the longest geodesic path of the skeleton's
    largest connected part (two Dijkstra sweeps)."""
    from scipy.sparse.csgraph import connected_components, dijkstra
    g, ys, xs = _graph(skel)
    _, labels = connected_components(g, directed=False)
    big = np.argmax(np.bincount(labels))
    start = int(np.flatnonzero(labels == big)[0])
    d = dijkstra(g, directed=False, indices=start)
    d[~np.isfinite(d)] = -1
    a = int(np.argmax(d))
    d, pred = dijkstra(g, directed=False, indices=a, return_predecessors=True)
    d[~np.isfinite(d)] = -1
    b = int(np.argmax(d))
    path = [b]
    while path[-1] != a and pred[path[-1]] >= 0:
        path.append(int(pred[path[-1]]))
    path = np.array(path[::-1])
    return np.stack([xs[path], ys[path]], 1).astype(np.float64)


def strip_of(mask: np.ndarray) -> Strip | None:
    """The :class:`Strip` of a boolean mask, or None when its skeleton is shorter than 4 px."""
    m = np.asarray(mask) > 0
    if m.sum() < 4:
        return None
    sk = skeleton_of(m)
    if sk.skel.sum() < 4:
        return None
    raw = _main_path(sk.skel)
    if len(raw) < 4:
        return None
    # resample to 1 px steps, smooth (σ ≈ the width: the path of a wide mask is smooth)
    seg = np.sqrt((np.diff(raw, axis=0) ** 2).sum(1))
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    k = max(4, int(round(arc[-1])) + 1)
    s = np.linspace(0.0, arc[-1], k)
    pts = np.stack([np.interp(s, arc, raw[:, 0]), np.interp(s, arc, raw[:, 1])], 1)
    wid_raw = sk.width[raw[:, 1].astype(int), raw[:, 0].astype(int)]
    wid = np.interp(s, arc, wid_raw)
    sigma = float(np.clip(np.median(wid), 1.5, 12.0))
    pad = int(3 * sigma) + 1
    ext = np.concatenate([2 * pts[:1] - pts[1:pad + 1][::-1], pts, 2 * pts[-1:] - pts[-pad - 1:-1][::-1]])
    ker = np.exp(-0.5 * (np.arange(-pad, pad + 1) / sigma) ** 2)
    ker /= ker.sum()
    smooth = np.stack([np.convolve(ext[:, i], ker, mode="valid") for i in range(2)], 1)
    pts = smooth[:k] if len(smooth) >= k else pts
    wid = np.convolve(np.pad(wid, pad, mode="edge"), ker, mode="valid")[:k]
    tan = np.gradient(pts, axis=0)
    tan /= np.maximum(np.linalg.norm(tan, axis=1, keepdims=True), 1e-6)
    nor = np.stack([-tan[:, 1], tan[:, 0]], 1)
    seg = np.sqrt((np.diff(pts, axis=0) ** 2).sum(1))
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    return Strip(pts, tan, nor, arc, np.maximum(wid, 0.5))


def strip_coords(strip: Strip, qx: np.ndarray, qy: np.ndarray, shape: tuple[int, int]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For query points ``(qx, qy)`` (float arrays) in a window of ``shape``: ``(u, s, k)`` —
    arc length (extended past the ends along the tangent), signed offset along the normal and the
    index of the nearest path point (through a distance transform of the rasterised path)."""
    from scipy import ndimage as ndi
    h, w = shape
    raster = -np.ones((h, w), np.int64)
    px = np.clip(np.round(strip.pts[:, 0]).astype(int), 0, w - 1)
    py = np.clip(np.round(strip.pts[:, 1]).astype(int), 0, h - 1)
    raster[py, px] = np.arange(len(px))
    _, (iy, ix) = ndi.distance_transform_edt(raster < 0, return_indices=True)
    rx = np.clip(np.round(qx).astype(int), 0, w - 1)
    ry = np.clip(np.round(qy).astype(int), 0, h - 1)
    k = raster[iy[ry, rx], ix[ry, rx]]
    vx, vy = qx - strip.pts[k, 0], qy - strip.pts[k, 1]
    along = vx * strip.tangent[k, 0] + vy * strip.tangent[k, 1]
    s = vx * strip.normal[k, 0] + vy * strip.normal[k, 1]
    at_end = (k == 0) & (along < 0) | (k == len(px) - 1) & (along > 0)
    u = strip.arc[k] + np.where(at_end, along, 0.0)
    s = np.where(at_end, s, np.sign(s) * np.sqrt(vx * vx + vy * vy))
    return u, s, k


def _fold(x: np.ndarray, length: float) -> np.ndarray:
    """``x`` reflected back and forth into ``[0, length]`` (a triangle wave)."""
    period = 2.0 * length
    r = np.mod(x, period)
    return np.where(r > length, period - r, r)


def strip_map(target: Strip, donor: Strip, qx: np.ndarray, qy: np.ndarray, shape: tuple[int, int],
              reverse: bool = False, mirror: bool = False, shift: float = 0.0, max_aniso: float = 2.0
              ) -> tuple[np.ndarray, np.ndarray]:
    """Donor-window coordinates ``(mx, my)`` (float32, for ``cv2.remap``) of target-window
    points ``(qx, qy)`` laid along the two strips.

    Across: the offset normalised by the local half-widths inside the masks (``|s| ≤ width``:
    the donor's cross-section fills the painted width), and scaled by √(donor / target width)
    (at least 1) outside them. Along: the target's arc length onto the donor's (ends onto ends)
    when that stretches the donor at most ``max_aniso`` times more (or less) than across;
    otherwise at that capped scale, the donor's arc reflected back and forth
    (a short donor is repeated mirror-wise rather than smeared along a long stroke). ``reverse``
    runs the donor backwards, ``shift`` (a fraction of its length) offsets where it starts,
    ``mirror`` flips it across."""
    u, s, k = strip_coords(target, qx, qy, shape)
    Lt, Ld = max(target.length, 1.0), max(donor.length, 1.0)
    beta_med = float(np.median(donor.width)) / max(float(np.median(target.width)), 0.5)
    along = float(np.clip(Ld / Lt, beta_med / max_aniso, beta_med * max_aniso))
    if reverse:
        u = Lt - u
    if mirror:
        s = -s
    ud = _fold(u * along + shift * Ld, Ld)
    j = np.interp(ud, donor.arc, np.arange(len(donor.arc)))
    j0 = np.clip(np.floor(j).astype(int), 0, len(donor.arc) - 1)
    j1 = np.clip(j0 + 1, 0, len(donor.arc) - 1)
    f = (j - j0)[..., None]
    P = (1 - f) * donor.pts[j0] + f * donor.pts[j1]
    Nn = (1 - f) * donor.normal[j0] + f * donor.normal[j1]
    wd = (1 - f[..., 0]) * donor.width[j0] + f[..., 0] * donor.width[j1]
    wt = target.width[k]
    beta = wd / np.maximum(wt, 0.5)
    k_out = np.maximum(1.0, np.sqrt(beta))
    a = np.abs(s)
    sd = np.sign(s) * np.where(a <= wt, a * beta, wd + (a - wt) * k_out)
    mx = P[..., 0] + Nn[..., 0] * sd
    my = P[..., 1] + Nn[..., 1] * sd
    return mx.astype(np.float32), my.astype(np.float32)


__all__ = ["Skeleton", "skeleton_of", "normals", "nearest", "offsets", "branch_rate", "Profile",
           "default_profile", "measure_profile", "profiles_for", "donor_key", "mask_key", "cached",
           "clear_cache", "mix", "soft_ceiling", "relight", "lab_to_rgb_float", "Strip", "strip_of",
           "elongation", "strip_coords", "strip_map", "T_MAX", "CHANNELS"]
