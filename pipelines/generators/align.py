"""Registration to the product's good images, structure vs background, and the background fill —
shared by the ``warp`` and ``remove`` generators.

What "background" means
-----------------------
A good image registered to the target usually shows the *same* structure under the mask (a
transistor's lead is there too), so copying its pixels at the same place changes nothing. The
background is what *surrounds* the structure (the board around a lead, the plate under a screw).
So the fill works in two steps:

1. **Structure vs background** (:func:`structure_mask`). A colour model of the background is
   fitted on the image's frame (a border 6 % of the short side wide: k-means in CIE LAB, one
   Gaussian per cluster, clusters with < 4 % of the frame dropped as stray product pixels); a
   pixel is structure when its Mahalanobis distance to every cluster exceeds :data:`STRUCTURE_THRESHOLD`.
   Small specks are dropped, gaps of ≤ 2 px closed, small enclosed holes filled, and the result
   is united with the goods' consensus foreground (:func:`pipelines.shapes.estimate_foreground`,
   carried over by the registration) when the goods have one. A product that fills the frame (a
   texture) has no structure: the whole mask is then the region to fill.
2. **Background fill** (:func:`pipelines.generators.fill.fill_background`, its own module): the pixels to replace are filled by copying
   background from elsewhere — in the target itself and in the good images registered to it —
   at *offsets* that preserve the background's pattern: the peaks of the background's masked,
   normalised autocorrelation (:func:`background_offsets`; a perforated board or a woven texture
   repeats at its period, so a hole lands where a hole belongs), plus seeded random far offsets
   for an aperiodic background. Each (source, offset) candidate is scored by how well its copy
   matches the target's background in a ring around the region (mean |ΔRGB|); the region is
   covered greedily, best candidate first (the seed breaks near-ties), each piece's mean colour
   matched to the ring, and a pixel no candidate can cover (no background source at any offset)
   falls back to ``cv2.inpaint`` (Telea) — so does the whole region when there are no sources.

Registration (:func:`align_goods`): the goods nearest the target by the guard's 32 × 32
fingerprint distance (:func:`pipelines.guard.distances`), minus any good identical or
near-identical to the target (distance < :data:`pipelines.guard.NEAR_DUPLICATE_THRESHOLD` — the
target is often one of the goods), each registered by ECC (Euclidean motion, at most 160 px,
phase-correlation start, the mask region ignored). A good whose ECC correlation stays below
:data:`ROTATION_SEARCH` is tried again from the best of 12 rotations (products lying in random
orientations; kept when it correlates better by 0.05); one below :data:`MIN_ECC` is not used. Goods of other sizes are resized to
the target's first.

Caches (keyed by pixel hashes, bounded): fingerprints, structure masks, the goods' foreground.
"""
from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import cv2
import numpy as np
from pipelines import masks as mk

STRUCTURE_THRESHOLD = 3.5     # Mahalanobis distance (LAB) to the nearest background colour
MIN_ECC = 0.6                 # ECC correlation a registered good needs to be used
ROTATION_SEARCH = 0.8         # below it, registration also tries 12 rotations (random orientations)
FRAME = 0.06                  # frame width (share of the short side) the background model reads
_REG_SIDE = 160               # registration works at most this large
_DISC3 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
_DISC5 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
_DISC7 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))


# --------------------------------------------------------------------------------------------
# Small helpers and caches
# --------------------------------------------------------------------------------------------
class LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        val = self[key] = make()
        if len(self) > self.size:
            self.popitem(last=False)
        return val


_FP = LRU(1024)
_STRUCT = LRU(256)
_FG = LRU(16)


def pixel_key(arr: np.ndarray) -> str:
    """A short cache key of an array: its shape, the sum of its values and a hash of every 3rd
    row and column (an edit of 3 × 3 px or more changes it; cheap enough to key 40 goods per call)."""
    a = np.asarray(arr)
    h = hashlib.blake2b(np.ascontiguousarray(a[::3, ::3]).tobytes(), digest_size=12)
    h.update(str((a.shape, a.dtype.str, int(a.sum(dtype=np.int64)))).encode())
    return h.hexdigest()


def rgb_u8(img: Any) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or a.dtype != np.uint8:
        raise ValueError(f"a good image must be H×W×3 uint8, got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a[..., :3])


def grey(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)


def _lab(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.GaussianBlur(img, (0, 0), 0.8), cv2.COLOR_RGB2LAB).astype(np.float32)


def fit_size(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``img`` resized to ``hw`` (H, W) when it is another size."""
    if img.shape[:2] == tuple(hw):
        return img
    return cv2.resize(img, (hw[1], hw[0]), interpolation=cv2.INTER_AREA)


def moments(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(centroid (x, y), axes 2×2 with the major axis first as columns, σ (major, minor))``."""
    ys, xs = np.nonzero(m)
    if xs.size == 0:              # an empty mask: the frame's centre, no direction
        return np.array([(m.shape[1] - 1) / 2, (m.shape[0] - 1) / 2]), np.eye(2), np.full(2, 1e-4)
    pts = np.stack([xs, ys]).astype(np.float64)
    c = pts.mean(axis=1)
    cov = np.cov(pts) if xs.size > 1 else np.zeros((2, 2))
    ev, vec = np.linalg.eigh(cov + np.eye(2) / 12.0)
    return c, vec[:, ::-1].copy(), np.sqrt(np.maximum(ev[::-1], 1e-9))


# --------------------------------------------------------------------------------------------
# Structure vs background
# --------------------------------------------------------------------------------------------
def background_model(image: np.ndarray, frame: float = FRAME, k: int = 5
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``(centres [k'×3], inverse covariances [k'×3×3])`` of the frame's LAB colours (k-means)."""
    h, w = image.shape[:2]
    b = max(2, int(round(frame * min(h, w))))
    fr = np.ones((h, w), bool)
    fr[b:h - b, b:w - b] = False
    x = _lab(image)[fr]
    if len(x) > 6000:
        x = x[np.random.default_rng(0).choice(len(x), 6000, replace=False)]
    k = int(min(k, max(1, len(x) // 50)))
    crit = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.5)
    cv2.setRNGSeed(0)
    _, lbl, cen = cv2.kmeans(x, k, None, crit, 2, cv2.KMEANS_PP_CENTERS)
    lbl = lbl.ravel()
    cents, icovs = [], []
    for j in range(k):
        xs = x[lbl == j]
        if len(xs) < max(10, 0.04 * len(x)):
            continue
        cov = np.cov(xs.T) + np.eye(3) * 4.0
        cents.append(cen[j])
        icovs.append(np.linalg.inv(cov))
    if not cents:
        cents, icovs = [x.mean(0)], [np.linalg.inv(np.cov(x.T) + np.eye(3) * 4.0)]
    return np.array(cents, np.float32), np.array(icovs, np.float32)


def _whiten(icov: np.ndarray) -> np.ndarray:
    """``L`` with ``Lᵀ L = icov`` (so ``|L d|`` is the Mahalanobis length of ``d``)."""
    return np.linalg.cholesky(icov.astype(np.float64)).T.astype(np.float32)


def _colour_codes(image: np.ndarray):
    """The image's blurred LAB colours once each: ``(colours [u×3] float32, inverse [H·W])``."""
    lab8 = cv2.cvtColor(cv2.GaussianBlur(image, (0, 0), 0.8), cv2.COLOR_RGB2LAB).reshape(-1, 3)
    codes = (lab8[:, 0].astype(np.int32) << 16) | (lab8[:, 1].astype(np.int32) << 8) | lab8[:, 2]
    uniq, inverse = np.unique(codes, return_inverse=True)     # each colour once
    lab = np.stack([uniq >> 16, (uniq >> 8) & 255, uniq & 255], 1).astype(np.float32)
    return lab, inverse.ravel()


def background_distance(image: np.ndarray, model: tuple[np.ndarray, np.ndarray],
                        threshold: float = STRUCTURE_THRESHOLD) -> np.ndarray:
    """``H×W`` float32: the Mahalanobis distance of each pixel's colour to the nearest background
    colour — a cluster centre, or, for a pixel beside background pixels of two clusters (within
    2 px), a mix of those two (the segment between their centres: an edge between two background
    colours is background too; a grey lead on a copper board next to a dark hole is not)."""
    h, w = image.shape[:2]
    lab, inverse = _colour_codes(image)
    cents, icovs = model
    d_pt = np.stack([np.sqrt(np.maximum(((lab - c) @ _whiten(ic).T) ** 2, 0).sum(1))
                     for c, ic in zip(cents, icovs)])                     # k × u
    best = d_pt.min(0)
    nearest = d_pt.argmin(0)[inverse].reshape(h, w)
    confident = (best[inverse] <= threshold).reshape(h, w)
    near = [cv2.dilate(((nearest == i) & confident).astype(np.uint8), _DISC5) > 0
            for i in range(len(cents))]
    out = best[inverse].reshape(h, w).copy()
    for i in range(len(cents)):
        for j in range(i + 1, len(cents)):
            both = near[i] & near[j] & (out > threshold)
            if not both.any():
                continue
            seg = cents[j] - cents[i]
            t = np.clip((lab - cents[i]) @ (seg / max(float(seg @ seg), 1e-6)), 0.0, 1.0)
            z = (lab - cents[i] - t[:, None] * seg) @ _whiten(0.5 * (icovs[i] + icovs[j])).T
            d_seg = np.sqrt((z * z).sum(1))[inverse].reshape(h, w)
            out[both] = np.minimum(out[both], d_seg[both])
    return out.astype(np.float32)


def _structure(image: np.ndarray, threshold: float) -> np.ndarray:
    h, w = image.shape[:2]
    raw = background_distance(image, background_model(image), threshold) > threshold
    raw8 = cv2.morphologyEx(raw.astype(np.uint8), cv2.MORPH_CLOSE, _DISC7)
    n, lab, st, _ = cv2.connectedComponentsWithStats(raw8, connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = st[1:, cv2.CC_STAT_AREA] >= max(6, 2e-4 * h * w)
    m = keep[lab]
    from scipy import ndimage as ndi   # here: the registry imports this module for every list
    holes = ndi.binary_fill_holes(m) & ~m
    n, lab, st, _ = cv2.connectedComponentsWithStats(holes.astype(np.uint8), connectivity=4)
    small = np.zeros(n, bool)
    small[1:] = st[1:, cv2.CC_STAT_AREA] <= 0.002 * h * w
    return m | small[lab]


def structure_mask(image: np.ndarray, threshold: float = STRUCTURE_THRESHOLD) -> np.ndarray:
    """``H×W bool``: where ``image`` is not its own background (see the module docstring);
    cached per image."""
    return _STRUCT.get_or((pixel_key(image), threshold), lambda: _structure(image, threshold)).copy()


def goods_foreground(goods: Sequence[np.ndarray], hw: tuple[int, int]) -> np.ndarray | None:
    """The goods' consensus foreground (``H×W bool`` at ``hw``) or None (no clear object)."""
    if len(goods) < 2:
        return None

    def make():
        from pipelines.shapes import estimate_foreground
        fg = estimate_foreground([fit_size(g, hw) for g in goods])
        return None if fg.all() else fg
    key = (tuple(pixel_key(g[::7, ::7]) for g in goods), hw)
    return _FG.get_or(key, make)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------
def fingerprint(img: np.ndarray) -> np.ndarray:
    from pipelines.guard import fingerprint as fp
    return _FP.get_or(pixel_key(img), lambda: fp(img))


NEAR_IDENTICAL = 1.0          # mean |Δ| of 32 × 32 grey fingerprints: the same photo (re-encoded ≤ 0.2)


def nearest_goods(target: np.ndarray, goods: Sequence[np.ndarray]) -> list[tuple[int, float]]:
    """``[(index, distance)]`` of the goods by fingerprint distance to ``target`` (the guard's
    trimmed distance, :func:`pipelines.guard.distances`), nearest first, without those identical
    or near-identical to it — the same photo, maybe re-encoded or locally edited: a mean
    fingerprint difference under :data:`NEAR_IDENTICAL` grey levels (the target is often one of
    the goods; copying its own pixels back would change nothing)."""
    from pipelines.guard import distances
    if not goods:
        return []
    fp = fingerprint(target)
    fps = np.stack([fingerprint(g) for g in goods])
    same = np.abs(fps - fp[None]).reshape(len(goods), -1).mean(1) < NEAR_IDENTICAL
    d = distances(fp, fps)
    order = np.argsort(d, kind="stable")
    return [(int(i), float(d[i])) for i in order if not same[i]]


def _ecc1(tmpl, inp, warp, mask, motion, iters):
    crit = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, iters, 1e-4)
    try:
        cc, w = cv2.findTransformECC(tmpl, inp, warp.astype(np.float32), motion, crit, mask, 3)
        return w.astype(np.float64), float(cc)
    except cv2.error:
        return warp.astype(np.float64), -1.0


def _ecc(tmpl: np.ndarray, inp: np.ndarray, warp: np.ndarray, mask: np.ndarray | None,
         iters: int = 40, max_turn: float = 10.0) -> tuple[np.ndarray, float]:
    """ECC: the translation first, then a Euclidean refinement kept only when it correlates
    better and turns by ≤ ``max_turn`` degrees from the start (a scene with one straight
    feature lets a free rotation slide into a wrong optimum); larger turns come from the
    rotation search of :func:`register`."""
    a0 = math.degrees(math.atan2(warp[1, 0], warp[0, 0]))
    wt, ct = _ecc1(tmpl, inp, warp, mask, cv2.MOTION_TRANSLATION if abs(a0) < 1e-6 else cv2.MOTION_EUCLIDEAN, iters)
    we, ce = _ecc1(tmpl, inp, wt if ct > -1 else warp, mask, cv2.MOTION_EUCLIDEAN, iters)
    turn = abs((math.degrees(math.atan2(we[1, 0], we[0, 0])) - a0 + 180) % 360 - 180)
    if ce > ct + 0.01 and turn <= max_turn:
        return we, ce
    return wt, ct


def _rot(angle_deg: float, centre: tuple[float, float]) -> np.ndarray:
    """2×3 map target coords → good coords for a rotation about ``centre``."""
    return cv2.getRotationMatrix2D(centre, angle_deg, 1.0).astype(np.float64)


def register(target: np.ndarray, good: np.ndarray, ignore: np.ndarray | None = None,
             rotations: bool = True) -> tuple[np.ndarray, float]:
    """``(W, score)``: ``W`` 2×3 maps target pixel coords to good coords (``warpAffine(good, W,
    flags=WARP_INVERSE_MAP)`` is the good aligned to the target), ``score`` the ECC correlation
    (−1: failed). ``ignore``: target pixels left out (the mask region)."""
    h, w = target.shape[:2]
    s = min(1.0, _REG_SIDE / max(h, w))
    size = (max(8, round(w * s)), max(8, round(h * s)))
    t = cv2.GaussianBlur(cv2.resize(grey(target), size, interpolation=cv2.INTER_AREA), (0, 0), 1.0)
    g = cv2.GaussianBlur(cv2.resize(grey(good), size, interpolation=cv2.INTER_AREA), (0, 0), 1.0)
    m = None
    if ignore is not None and ignore.any():
        keep = cv2.resize((~ignore).astype(np.uint8) * 255, size, interpolation=cv2.INTER_NEAREST)
        m = keep if keep.mean() > 0.25 * 255 else None
    win = cv2.createHanningWindow(size, cv2.CV_32F)
    (dx, dy), _ = cv2.phaseCorrelate(t.copy(), g.copy(), win)   # (it may window its inputs in place)
    warp0 = np.array([[1, 0, dx], [0, 1, dy]], np.float64)
    warp, cc = _ecc(t, g, warp0, m)
    if cc < MIN_ECC:                                  # phase correlation may lock onto noise
        w1, cc1 = _ecc(t, g, np.array([[1, 0, 0], [0, 1, 0]], np.float64), m)
        if cc1 > cc:
            warp, cc = w1, cc1
    if cc < ROTATION_SEARCH and rotations:
        c = ((size[0] - 1) / 2.0, (size[1] - 1) / 2.0)
        best = (-np.inf, 0.0)
        for ang in range(30, 360, 30):
            r = _rot(ang, c)
            gr = cv2.warpAffine(g, r, size, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                borderMode=cv2.BORDER_REFLECT)
            (ddx, ddy), resp = cv2.phaseCorrelate(t.copy(), gr, win)
            if resp > best[0]:
                best = (resp, ang, ddx, ddy)
        if np.isfinite(best[0]):
            _, ang, ddx, ddy = best
            r = _rot(ang, c)
            # target x → x + d (in the rotated good) → rotated back into the good
            w0 = r.copy()
            w0[:, 2] += r[:, :2] @ np.array([ddx, ddy])
            w2, cc2 = _ecc(t, g, w0, m)
            if cc2 >= MIN_ECC and cc2 > cc + 0.05:
                warp, cc = w2, cc2
    full = warp.copy()
    full[:, 2] /= s
    return full, cc


@dataclass
class Aligned:
    """A good image registered to the target: ``image`` (target's size), ``valid`` (inside the
    good's frame), ``structure`` (its structure mask, registered), ``score``, ``index``."""
    image: np.ndarray
    valid: np.ndarray
    structure: np.ndarray
    score: float
    index: int
    warp: np.ndarray = field(repr=False, default=None)


def warp_to(img: np.ndarray, warp: np.ndarray, hw: tuple[int, int], nearest: bool = False,
            border: int = cv2.BORDER_CONSTANT) -> np.ndarray:
    flags = (cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR) | cv2.WARP_INVERSE_MAP
    return cv2.warpAffine(img, warp.astype(np.float32), (hw[1], hw[0]), flags=flags, borderMode=border)


def align_goods(target: np.ndarray, goods: Sequence[np.ndarray] | None, k: int = 2,
                ignore: np.ndarray | None = None, tries: int = 4) -> list[Aligned]:
    """Up to ``k`` goods registered to ``target`` (nearest first; near-identical ones skipped;
    at most ``tries`` registrations), each with its structure mask carried over."""
    if not goods:
        return []
    hw = target.shape[:2]
    goods = [fit_size(rgb_u8(g), hw) for g in goods]
    fg = goods_foreground(goods, hw)           # in the goods' common frame
    out: list[Aligned] = []
    for i, _ in nearest_goods(target, goods)[:tries]:
        warp, cc = register(target, goods[i], ignore)
        if cc < MIN_ECC:
            continue
        g = goods[i]
        img = warp_to(g, warp, hw, border=cv2.BORDER_REFLECT)
        valid = warp_to(np.full(hw, 255, np.uint8), warp, hw, nearest=True) > 0
        own = full_structure(g, fg)
        struct = warp_to(own.astype(np.uint8), warp, hw, nearest=True) > 0
        common = valid & ~struct & ~structure_mask(target)
        if ignore is not None:
            common &= ~ignore
        if common.sum() > 100:            # the good's exposure matched to the target's
            gain = target[common].astype(np.float64).mean(0) / np.maximum(img[common].mean(0), 1.0)
            img = np.clip(img * np.clip(gain, 0.7, 1.4), 0, 255).astype(np.uint8)
        out.append(Aligned(img, valid, struct, cc, i, warp))
        if len(out) >= k:
            break
    return out


def target_structure(target: np.ndarray, aligned: Sequence[Aligned],
                     goods: Sequence[np.ndarray] | None) -> np.ndarray:
    """The target's structure (:func:`full_structure`), with the goods' consensus foreground
    carried over by the best registration (when the goods have one and one aligned)."""
    fg = None
    if aligned and goods is not None and len(goods) >= 2:
        fg_goods = goods_foreground([rgb_u8(g) for g in goods], target.shape[:2])
        if fg_goods is not None:
            fg = warp_to(fg_goods.astype(np.uint8), aligned[0].warp, target.shape[:2], nearest=True) > 0
    return full_structure(target, fg)


# --------------------------------------------------------------------------------------------
# Background offsets: peaks of the masked normalised autocorrelation
# --------------------------------------------------------------------------------------------
def _masked_autocorr(f: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Masked NCC of ``f`` with itself at every shift (Padfield 2012), fft-shifted so that the
    zero shift is at the centre; overlaps under 20 % of the mask are 0."""
    h, w = f.shape
    H, W = 2 * h, 2 * w
    mf = m * f
    F = [np.fft.rfft2(a, (H, W)) for a in (m, mf, mf * f)]
    cc = lambda a, b: np.fft.irfft2(np.conj(a) * b, (H, W))
    n = cc(F[0], F[0])
    s1, s2 = cc(F[1], F[0]), cc(F[0], F[1])
    p = cc(F[1], F[1])
    q1, q2 = cc(F[2], F[0]), cc(F[0], F[2])
    n = np.maximum(n, 1.0)
    num = p - s1 * s2 / n
    den = np.sqrt(np.maximum(q1 - s1 * s1 / n, 0) * np.maximum(q2 - s2 * s2 / n, 0))
    ncc = np.where((den > 1e-3 * n) & (n > 0.2 * m.sum()), num / np.maximum(den, 1e-9), 0.0)
    return np.fft.fftshift(ncc)


def _add_lattice(out: list, seen: set, h: int, w: int, refine, ncc_at) -> None:
    """Append to ``out`` the rest of the lattice the two shortest strong periods (ncc ≥ 0.5) of
    ``out`` span — a pixel's same-phase copies all over the image: a robust median even where a
    few of them are structure at the same phase — each shift refined to ±1 px (``refine``)."""
    nb1 = np.array([(a, b) for a in range(-1, 2) for b in range(-1, 2)])
    strong = sorted([o for o in out if o[2] >= 0.5], key=lambda o: math.hypot(o[0], o[1]))
    if strong:
        b1 = np.array(strong[0][:2], float)
        b2 = next((np.array(o[:2], float) for o in strong[1:]
                   if abs(b1[0] * o[1] - b1[1] * o[0]) > 0.5 * np.hypot(*b1) * math.hypot(o[0], o[1])), None)
        basis = [b1] if b2 is None else [b1, b2]
        kmax = [int(max(h, w) / max(1.0, np.hypot(*b))) + 1 for b in basis]
        grid = ([(k, 0) for k in range(-kmax[0], kmax[0] + 1)] if b2 is None else
                [(k, l) for k in range(-kmax[0], kmax[0] + 1) for l in range(-kmax[1], kmax[1] + 1)])
        for k, l in grid:
            d = k * basis[0] + (l * basis[1] if b2 is not None else 0)
            if (k, l) == (0, 0) or abs(d[0]) >= h - 8 or abs(d[1]) >= w - 8:
                continue
            if any(abs(d[0] - o[0]) <= 2 and abs(d[1] - o[1]) <= 2 for o in out):
                continue
            key = refine(d, nb1)
            if key is not None and key not in seen:
                seen.add(key)
                out.append((*key, max(0.5, ncc_at(key))))


def background_offsets(image: np.ndarray, background: np.ndarray, n: int = 24,
                       min_shift: float | None = None) -> list[tuple[int, int, float]]:
    """``[(dy, dx, ncc)]``: the shifts at which the background repeats (the ``n`` strongest peaks
    of its masked normalised autocorrelation, computed at most 128 px large and refined to the
    pixel, strongest first), then the rest of the lattice the two shortest strong periods span
    (each refined; ncc ≥ 0.5). Shifts shorter than ``min_shift`` (default 5 % of the short side,
    at least 8 px) are left out."""
    h, w = image.shape[:2]
    if background.sum() < 64:
        return []
    s = min(1.0, 128.0 / max(h, w))
    size = (max(8, round(w * s)), max(8, round(h * s)))
    g = cv2.resize(grey(image), size, interpolation=cv2.INTER_AREA)
    m = cv2.resize(background.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(np.float64)
    g = g.astype(np.float64)
    if m.sum() < 32 or g[m > 0].std() < 1.0:
        return []
    ncc = _masked_autocorr(g, m)
    H, W = ncc.shape
    cy, cx = H // 2, W // 2
    yy, xx = np.mgrid[0:H, 0:W]
    r = np.hypot(yy - cy, xx - cx) / s
    lo = max(8.0, 0.05 * min(h, w)) if min_shift is None else min_shift
    ncc[r < lo] = 0.0
    from scipy import ndimage as ndi
    peaks = (ncc == ndi.maximum_filter(ncc, size=5)) & (ncc > 0.25) & (r >= lo + 2.5 / s)
    # (a maximum on the excluded disc's rim is the slope of the zero-shift peak, not a period)
    ys, xs = np.nonzero(peaks)
    order = np.argsort(-ncc[ys, xs])[: 2 * n]
    gf = grey(image)
    bg_y, bg_x = np.nonzero(background)
    pick = np.random.default_rng(0).choice(len(bg_y), min(800, len(bg_y)), replace=False)
    by, bx = bg_y[pick], bg_x[pick]
    gv = gf[by, bx]
    nb2 = np.array([(a, b) for a in range(-2, 3) for b in range(-2, 3)])

    def refine(d0: np.ndarray, nb: np.ndarray = nb2) -> tuple[int, int] | None:
        """The shift within ±2 (±1) px of ``d0`` whose copy of the background matches it best."""
        cand = np.round(d0).astype(int)[None, :] + nb                # 25 (9) × 2
        ty, tx = by[None, :] + cand[:, :1], bx[None, :] + cand[:, 1:]
        ok = (ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)
        tyc, txc = np.clip(ty, 0, h - 1), np.clip(tx, 0, w - 1)
        ok &= background[tyc, txc]
        cnt = ok.sum(1)
        err = np.where(ok, np.abs(gv[None, :] - gf[tyc, txc]), 0).sum(1) / np.maximum(cnt, 1)
        err[cnt < 30] = np.inf
        k = int(np.argmin(err))
        return (int(cand[k, 0]), int(cand[k, 1])) if np.isfinite(err[k]) else None

    def ncc_at(d) -> float:
        y, x = int(round(cy + d[0] * s)), int(round(cx + d[1] * s))
        return float(ncc[y, x]) if 0 <= y < H and 0 <= x < W else 0.0

    out: list[tuple[int, int, float]] = []
    seen: set = set()
    for j in order:
        key = refine(np.array([(ys[j] - cy) / s, (xs[j] - cx) / s]))
        if key is not None and key not in seen:
            seen.add(key)
            out.append((*key, float(ncc[ys[j], xs[j]])))
        if len(out) >= n:
            break
    _add_lattice(out, seen, h, w, refine, ncc_at)
    return out


def nanmedian0(vals: np.ndarray) -> np.ndarray:
    """Median over axis 0 ignoring NaNs (NaN where all are NaN) — np.sort puts NaNs last, so the
    median of the ``c`` valid values is at ranks ``(c − 1) // 2`` and ``c // 2`` (faster than
    ``np.nanmedian``)."""
    srt = np.sort(vals, axis=0)
    cnt = np.isfinite(vals).sum(0)
    lo = np.clip((cnt - 1) // 2, 0, None)[None]
    hi = np.clip(cnt // 2, 0, len(vals) - 1)[None]
    m = 0.5 * (np.take_along_axis(srt, lo, 0)[0] + np.take_along_axis(srt, hi, 0)[0])
    return np.where(cnt > 0, m, np.nan).astype(np.float32)


def periodic_structure(image: np.ndarray, structure: np.ndarray,
                       offsets: Sequence[tuple[int, int, float]], min_ncc: float = 0.5,
                       threshold: float | None = None, taps: int = 32) -> np.ndarray:
    """Pixels unlike what a *periodic* background predicts there (``H×W bool``; empty when the
    background does not repeat: fewer than 4 periods with an autocorrelation ≥ ``min_ncc``).

    The prediction is the per-pixel median of the image at the ``taps`` shortest lattice shifts
    (:func:`background_offsets`; sources on ``structure`` left out) — a clean plate of the
    background, right even where a few same-phase copies are structure (a transistor's leads sit
    at the board's pitch). A pixel whose largest channel differs from it by more than
    ``threshold`` (default: 30 grey levels or 3 × the median residual on the background) is
    structure; thin lines (the board is not exactly periodic: hole rims) are opened away.
    Computed at most 160 px large."""
    offs = sorted([(dy, dx) for dy, dx, c in offsets if c >= min_ncc], key=lambda o: math.hypot(*o))[:taps]
    h, w = structure.shape
    if len(offs) < 4:
        return np.zeros((h, w), bool)
    sc = min(1.0, 160.0 / max(h, w))
    size = (max(8, round(w * sc)), max(8, round(h * sc)))
    f = cv2.resize(image, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    st = cv2.resize(structure.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    hh, ww = st.shape
    ys, xs = np.mgrid[0:hh, 0:ww]
    ys, xs = ys.ravel(), xs.ravel()
    vals = np.full((len(offs), len(ys), 3), np.nan, np.float32)
    for k, (dy, dx) in enumerate(offs):
        ty, tx = ys + int(round(dy * sc)), xs + int(round(dx * sc))
        ok = (ty >= 0) & (ty < hh) & (tx >= 0) & (tx < ww)
        ok[ok] &= ~st[ty[ok], tx[ok]]
        vals[k, ok] = f[ty[ok], tx[ok]]
    cnt = np.isfinite(vals[..., 0]).sum(0)
    med = nanmedian0(vals)
    res = np.abs(f.reshape(-1, 3) - med).max(-1)
    res[(cnt < 3) | ~np.isfinite(res)] = 0.0
    res = res.reshape(hh, ww)
    if threshold is None:
        bg = ~st & (cnt.reshape(hh, ww) >= 3)
        base = float(np.median(res[bg])) if bg.sum() > 50 else 10.0
        threshold = max(30.0, 3.0 * base)
    raw = cv2.morphologyEx((res > threshold).astype(np.uint8), cv2.MORPH_OPEN, _DISC3)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(raw, connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= max(4, 3e-4 * hh * ww)
    raw = keep[lab].astype(np.uint8)
    if sc < 1.0:
        raw = cv2.resize(raw, (w, h), interpolation=cv2.INTER_NEAREST)
    return raw > 0


_FULL = LRU(256)


def full_structure(image: np.ndarray, foreground: np.ndarray | None = None) -> np.ndarray:
    """The structure of one image (cached): colour outliers (:func:`structure_mask`) ∪
    ``foreground`` ∪ deviations from its periodic background (:func:`periodic_structure`)."""
    def make():
        s0 = structure_mask(image)
        if foreground is not None:
            s0 |= foreground
        offs = background_offsets(image, ~s0)
        return s0 | periodic_structure(image, s0, offs)
    key = (pixel_key(image), None if foreground is None else pixel_key(foreground.astype(np.uint8)))
    return _FULL.get_or(key, make).copy()


__all__ = ["structure_mask", "background_model", "background_distance", "goods_foreground",
           "nearest_goods", "register", "align_goods", "Aligned", "target_structure",
           "background_offsets", "periodic_structure", "full_structure", "nanmedian0", "moments", "fit_size",
           "pixel_key", "rgb_u8", "grey", "LRU", "STRUCTURE_THRESHOLD", "MIN_ECC"]
