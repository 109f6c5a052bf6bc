"""``stroke``: a thin defect — crack, scratch, cut — rendered along the painted mask's skeleton.

A crack painted as a 3 px line should come out as a 3 px crack that runs the whole line, with
the cross-section real cracks of this type have. This generator does not paste anything: it
skeletonises the mask and renders, along the skeleton, a cross-section profile
(:mod:`pipelines.generators.profiles`) — measured perpendicular to the skeletons of the type's
reference defects when there are some (``donors``; ``info.learns_from_donors``), else the default
profile of the damage type's style (:func:`pipelines.classical.style_for`: crack, scratch, cut
(``broken``), mark (``blob``), tint (``color``)).

Algorithm (the working window around the mask)
----------------------------------------------
1. **Skeleton** of the mask with the local half-width ``w`` (the inside distance transform), the
   normal, the geodesic distance to the nearest end and the length of each part
   (:func:`profiles.skeleton_of`). A wide mask is a stroke of its own local width.
2. **Profile**: the seed picks one reference profile and mixes in a second (weight ≤ 0.5·jitter),
   or draws a variant of the style's default (depth ×0.7..1.3, core width ×0.8..1.25 at jitter
   0.5; a scratch's polarity, a mark's tint); ``contrast`` scales it, ``rim`` its lips / lit rim
   (:meth:`profiles.Profile.scaled`); a seeded gain ×e^(±0.5·jitter) varies its depth.
3. **Branches** (where the type's shapes have them: the reference masks' skeleton branch points
   per 100 px, else 2 for cracks and 0 for the rest; ``branches`` overrides): side cracks that
   leave the skeleton at 25–60°, wander and taper, and stop where the feather would fade them
   (they stay inside ``dilate(mask, 0.85·feather)``; the feather fades their tips).
4. **Render**: every pixel's signed offset from its nearest skeleton pixel ``q``,
   ``t = (±|p − q| − wander(q)) / (w(q)·width·ω(q)·τ_w(q))``; the deviation is
   ``A(q)·profile(t)``. Along the skeleton (2-D Perlin noise read at ``q``, so it varies along
   the stroke): the centreline wanders (cracks: ±0.9·max(w, 1.5 px)·noise at jitter 0.5), the width varies
   (``ω``, ×e^(±0.3·jitter)) and the depth by the reference's own relative variation
   (``along``). Ends taper over ``taper`` × the part's length: the width narrows to 35 % and
   the depth to 55 % at the tip. Branches are rendered the same way and the stronger deviation
   wins per pixel; the result is anti-aliased (σ = 0.5 px) and scaled by ``strength``.
5. **Re-light** (:func:`profiles.relight`): lightness by ratio (a −50 % crack is −50 % of the
   target's own L), chroma by ratio plus the reference's hue change; brightening is bounded by the
   reference's brightest L and chroma increases by its highest chroma (soft, never a clipped
   plateau); the log-lightness deviation stays within the references' own range; gamut-mapped
   into sRGB. Applied as an RGB delta; the base class composites (byte-identical outside
   ``dilate(mask, feather)``).

Measured profiles are cached per donor (hash of its arrays): a call with known donors measures
nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from pipelines import masks as mk
from pipelines.classical import donor_pair, fractal_noise, style_for
from pipelines.generator import GeneratorInfo, option
from pipelines.generators import profiles as P
from pipelines.generators.base import WindowedGenerator

_TIP_WIDTH, _TIP_DEPTH = 0.35, 0.55       # width / depth left at a tapered tip
_BRANCH_WIDTH = 0.55                      # a branch's width relative to where it leaves
_MAX_BRANCHES = 8
_WANDER = {"crack": 0.9, "broken": 0.3}  # centreline wander (× max(half-width, 1.5 px) at jitter 0.5)


@dataclass(frozen=True)
class StrokeOptions:
    style: str | None = option(None, "default cross-section when the type has no reference defects "
                                     "(crack, scratch, broken = a cut, blob = a mark, color = a tint; "
                                     "default: from the damage type's name)", choices=mk.STYLES)
    learn: bool = option(True, "learn the cross-section from the type's reference defects when there "
                               "are some (off: the style's default)")
    width: float = option(1.0, "defect width relative to the mask's local width", min=0.2, max=2.0,
                          step=0.05)
    contrast: float = option(1.0, "depth of the cross-section (lightness and colour deviation)",
                             min=0.0, max=2.0, step=0.05)
    rim: float = option(1.0, "lips and lit rim beside the core (the profile's opposite-sign lobes and "
                             "its light-direction part; 0 = none)", min=0.0, max=3.0, step=0.1)
    taper: float = option(0.2, "share of each part's length over which its ends narrow and fade",
                          min=0.0, max=0.5, step=0.05)
    branches: float | None = option(None, "side branches per 100 px of skeleton (default: as many as "
                                          "the reference masks have, else 2 for cracks, 0 otherwise)",
                                    min=0.0, max=10.0, step=0.5)
    jitter: float = option(0.5, "seeded variation: centreline wander, width and depth along the "
                                "stroke, profile mix (0 = none)", min=0.0, max=1.0, step=0.05)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


class StrokeGenerator(WindowedGenerator):
    """Thin defects along the painted stroke (see the module docstring)."""

    info = GeneratorInfo(
        "stroke", "1", "damage",
        "A crack, scratch or cut rendered along the painted stroke's skeleton with the cross-section "
        "of the type's reference defects (or the type's default); tapering ends, branches",
        options=StrokeOptions, learns_from_donors=True)
    _context = 2

    def check_params(self, params: dict) -> None:
        style = params.get("style")
        if style is not None and style not in mk.STYLES:
            raise ValueError(f"unknown defect style {style!r}; known: {', '.join(mk.STYLES)}")
        for i, pair in enumerate(params.get("donors") or []):
            donor_pair(pair, i)                  # fail fast on a bad donor, naming it

    # ---------------------------------------------------------------------------------------
    def _profiles(self, donors, learn, style, rng, jitter) -> tuple[list[P.Profile], float]:
        """The candidate profiles and the branch rate of the type's shapes."""
        if donors and learn:
            pairs = [donor_pair(p, i) for i, p in enumerate(donors)]
            profs = P.profiles_for([(img, m > 0) for img, m in pairs])
            return profs, float(np.mean([p.branching for p in profs]))
        prof = P.default_profile(style, rng, spread=2.0 * jitter)
        return [prof], prof.branching

    @staticmethod
    def _branches(sk: P.Skeleton, allowed: np.ndarray, rate: float, taper_px: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Side branches: ``(skel, width, depth)`` ``H×W`` (width / depth factors at their pixels,
        relative to the pixel they leave from)."""
        h, w = sk.skel.shape
        bskel = np.zeros((h, w), bool)
        bwidth = np.zeros((h, w), np.float32)
        bdepth = np.zeros((h, w), np.float32)
        ys, xs = np.nonzero(sk.skel)
        if rate <= 0 or ys.size < 6:
            return bskel, bwidth, bdepth
        n = int(min(_MAX_BRANCHES, rng.poisson(rate * ys.size / 100.0)))
        inner = sk.ends[ys, xs] >= np.maximum(taper_px[ys, xs], 2.0)
        cand = np.flatnonzero(inner) if inner.any() else np.arange(ys.size)
        for _ in range(n):
            i = int(cand[int(rng.integers(cand.size))])
            y0, x0 = ys[i], xs[i]
            nx, ny = sk.normal[y0, x0]
            tx, ty = -ny, nx
            if rng.random() < 0.5:
                tx, ty = -tx, -ty
            ang = math.atan2(ty, tx) + rng.choice([-1.0, 1.0]) * rng.uniform(0.45, 1.05)
            length = float(np.clip(rng.uniform(0.12, 0.35) * sk.length[y0, x0], 3.0, 80.0))
            w0 = float(sk.width[y0, x0])
            px, py, walked, path = float(x0), float(y0), 0.0, []
            while walked < length:
                ang += rng.normal(0.0, 0.18)
                px, py = px + 0.7 * math.cos(ang), py + 0.7 * math.sin(ang)
                walked += 0.7
                ix, iy = int(round(px)), int(round(py))
                if not (0 <= ix < w and 0 <= iy < h) or not allowed[iy, ix]:
                    break
                path.append((iy, ix, walked))
            if len(path) < 3:
                continue
            total = path[-1][2]
            for iy, ix, d in path:
                if sk.skel[iy, ix]:
                    continue
                f = 1.0 - d / max(total, 1e-6)                   # 1 at the root, 0 at the tip
                bskel[iy, ix] = True
                bwidth[iy, ix] = max(bwidth[iy, ix], _BRANCH_WIDTH * (_TIP_WIDTH + (1 - _TIP_WIDTH) * f)
                                     * max(w0, 0.75))
                bdepth[iy, ix] = max(bdepth[iy, ix], 0.85 * (_TIP_DEPTH + (1 - _TIP_DEPTH) * f))
        return bskel, bwidth, bdepth

    def _generate(self, crop, cmask, rng, feather, *, strength, donors=None, style=None, learn=True,
                  width=1.0, contrast=1.0, rim=1.0, taper=0.2, branches=None, jitter=0.5,
                  damage_type=None):
        style = style or style_for(damage_type)
        jitter = float(np.clip(jitter, 0.0, 1.0))
        h, w = cmask.shape
        m = cmask > 0

        # 1. the skeleton; 2. the profile (seeded pick and mix), scaled
        sk = P.skeleton_of(m)
        profs, rate = self._profiles(donors, learn, style, rng, jitter)
        i = int(rng.integers(len(profs)))
        prof = profs[i]
        if len(profs) > 1:
            j = int(rng.integers(len(profs) - 1))
            prof = P.mix(prof, profs[j + (j >= i)], 0.5 * jitter * float(rng.random()))
        prof = prof.scaled(float(contrast), float(rim))
        gain = float(np.exp(0.5 * jitter * rng.uniform(-1, 1)))

        # along-stroke fields (read at the nearest skeleton pixel)
        size = max(8.0, float(np.sqrt(max(sk.total_length, 1.0) * 8.0)))
        n_width = fractal_noise((h, w), rng, cell=max(6.0, size / 2), octaves=2)
        n_depth = fractal_noise((h, w), rng, cell=max(4.0, size / 3), octaves=3)
        n_wander = fractal_noise((h, w), rng, cell=rng.uniform(3.0, 7.0), octaves=3)
        wander_amp = 2.0 * jitter * _WANDER.get(style, 0.15)

        # tapering: over `taper` × the part's length (at least one half-width) from each end
        taper_px = np.maximum(float(taper) * sk.length, 1.5 * sk.width)
        tau = np.where(np.isfinite(sk.ends), _smoothstep(sk.ends / np.maximum(taper_px, 1e-6)), 1.0) \
            if taper > 0 else np.ones((h, w), np.float32)

        # 3. branches inside the region the feather keeps visible
        allowed = mk.dilate(np.where(m, 255, 0).astype(np.uint8), max(1.0, 0.85 * feather)) > 0
        rate = float(branches) if branches is not None else rate
        bskel, bwidth, bdepth = self._branches(sk, allowed, rate, taper_px, rng)

        # 4. render the main skeleton and the branches; the stronger deviation wins
        depth_along = np.clip(1.0 + jitter * 2.0 * prof.along * n_depth, 0.2, 2.0)
        width_along = np.exp(0.3 * jitter * n_width)
        dev = self._render(sk, sk.skel, prof, width * width_along * (_TIP_WIDTH + (1 - _TIP_WIDTH) * tau),
                           gain * depth_along * (_TIP_DEPTH + (1 - _TIP_DEPTH) * tau),
                           wander_amp * n_wander * np.maximum(sk.width, 1.5))
        if bskel.any():
            bsk = P.Skeleton(bskel, np.where(bskel, bwidth, sk.width).astype(np.float32),
                             P.normals(bskel), sk.ends, sk.length)
            bdev = self._render(bsk, bskel, prof, width * width_along, gain * depth_along * bdepth,
                                np.zeros((h, w), np.float32))
            dev = np.where((np.abs(bdev[..., :1]) > np.abs(dev[..., :1])), bdev, dev)
        dev = cv2.GaussianBlur(dev, (0, 0), 0.5)
        lo, hi = prof.log_l_range
        dev[..., 0] = np.clip(dev[..., 0], lo, hi)
        dev *= np.float32(strength)

        # 5. re-light (bounded), gamut-map, apply as an RGB delta
        lab = _lab(crop)
        out = P.relight(lab, dev, prof.L_hi, prof.C_hi)
        return crop.astype(np.float32) + (P.lab_to_rgb_float(out) - P.lab_to_rgb_float(lab))

    @staticmethod
    def _render(sk: P.Skeleton, skel: np.ndarray, prof: P.Profile, width_f: np.ndarray,
                depth_f: np.ndarray, wander: np.ndarray) -> np.ndarray:
        """The deviation ``[H x W x 4]`` of the profile along ``skel`` (factors read at each
        pixel's nearest skeleton pixel)."""
        h, w = skel.shape
        d, iy, ix = P.nearest(skel)
        n = sk.normal[iy, ix]
        yy, xx = np.mgrid[0:h, 0:w]
        side = (xx - ix) * n[..., 0] + (yy - iy) * n[..., 1]
        s = np.where(side < 0, -d, d) - wander[iy, ix]
        half = np.maximum(sk.width[iy, ix] * width_f[iy, ix], 0.35)
        t = s / half
        return (prof.at(t, n) * depth_f[iy, ix][..., None]).astype(np.float32)


def _lab(rgb: np.ndarray) -> np.ndarray:
    from pipelines.color import rgb_to_lab
    return rgb_to_lab(rgb).astype(np.float32)


__all__ = ["StrokeGenerator", "StrokeOptions"]
