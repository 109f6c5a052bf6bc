"""cut-paste and defect-transfer follow the painted mask (issue 22, item 4): the donor defect is
laid along an elongated stroke (its skeleton onto the stroke's) or warped outline onto outline
(thin-plate spline), instead of being pasted with its own outline; and defect-transfer's
re-lighting never clips: its highlights are bounded by the donor's own range.

The reported case: a thin diagonal stroke painted for ``crack`` on a photo of a food product;
cut-paste pasted a donor-shaped crack over part of the stroke, defect-transfer gave an over-bright
orange-white patch with clipped highlights. Synthetic stand-ins for both (an orange baked surface,
a crack whose inside shows the lighter dough) — no real data."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage.morphology import skeletonize

from pipelines import classical as C
from pipelines import masks as mk
from pipelines.classical import fractal_noise
from pipelines.color import rgb_to_lab
from pipelines.generators import profiles as P
from pipelines.registry import get_generator


def _surface(shape, seed, base):
    rng = np.random.default_rng(seed)
    n = fractal_noise(shape, rng, 24, 4)
    f = fractal_noise(shape, rng, 3, 2)
    img = np.array(base, np.float32)[None, None] * (1 + 0.12 * n[..., None] + 0.05 * f[..., None])
    return np.clip(img, 0, 255).astype(np.uint8)


def _crack_donor(seed, width=11, crust=(150, 85, 35), inner=(235, 205, 150)):
    """A darker crust with a wavy horizontal crack: a dark 2 px core inside lighter dough."""
    rng = np.random.default_rng(seed)
    img = _surface((256, 256), seed, crust).astype(np.float32)
    m = np.zeros((256, 256), np.uint8)
    pts = np.array([[60 + i * 14, 128 + rng.normal(0, 6)] for i in range(10)], np.int32).reshape(-1, 1, 2)
    cv2.polylines(m, [pts], False, 255, width)
    core = np.zeros_like(m)
    cv2.polylines(core, [pts], False, 255, 2)
    dough = (m > 0) & (core == 0)
    img[dough] = np.array(inner, np.float32) * (0.95 + 0.1 * rng.random((int(dough.sum()), 1)))
    img[core > 0] *= 0.35
    return img.astype(np.uint8), m


def _stroke(shape=(256, 256), width=3):
    m = np.zeros(shape, np.uint8)
    cv2.line(m, (50, 200), (200, 60), 255, width)
    return m


@pytest.fixture(scope="module")
def food():
    return _surface((256, 256), 5, (225, 150, 60)), [_crack_donor(1), _crack_donor(2)], _stroke()


def _changed(out, img, level=10):
    return np.abs(out.astype(int) - img.astype(int)).max(axis=2) >= level


# ------------------------------------------------------------------------- along the stroke
@pytest.mark.parametrize("name", ["cutpaste", "defect-transfer"])
def test_a_crack_donor_runs_the_whole_thin_stroke(food, name):
    """A horizontal donor crack onto a thin diagonal stroke: the change covers ≥ 85 % of the
    stroke's skeleton in every seed (before: cut-paste covered the part its donor's bbox landed on)
    and ≥ 90 % of it (|Δ| summed) lies within 2 px of the stroke."""
    img, donors, mask = food
    skel = skeletonize(mask > 0)
    near = mk.dilate(mask, 2) > 0
    for seed in range(3):
        out = get_generator(name)(img, mask, seed=seed, feather=4, damage_type="crack", donors=donors)
        assert _changed(out, img)[skel].mean() >= 0.85, (name, seed)
        d = np.abs(out.astype(float) - img).sum(axis=2)
        assert d[near].sum() >= 0.9 * d.sum(), (name, seed)


def test_strip_map_lays_the_donor_path_along_the_target():
    """Points on the target's skeleton map onto the donor's skeleton, ends onto ends; the
    target's mask edge onto the donor's."""
    target = _stroke() > 0
    donor = np.zeros((120, 200), bool)
    donor[58:63, 20:180] = True                         # horizontal, 5 px wide
    ts, ds = P.strip_of(target), P.strip_of(donor)
    assert ts.elongation > 20 and ds.elongation > 20
    qx, qy = ts.pts[:, 0], ts.pts[:, 1]
    mx, my = P.strip_map(ts, ds, qx, qy, target.shape)
    assert np.abs(my - 60).max() < 1.5                  # on the donor's centre line
    assert abs(mx[0] - ds.pts[0, 0]) < 3 and abs(mx[-1] - ds.pts[-1, 0]) < 3
    edge_x, edge_y = qx + ts.normal[:, 0] * ts.width, qy + ts.normal[:, 1] * ts.width
    _, my_edge = P.strip_map(ts, ds, edge_x, edge_y, target.shape)
    mid = slice(len(qx) // 4, 3 * len(qx) // 4)
    assert np.abs(np.abs(my_edge[mid] - 60) - ds.width[len(ds.width) // 2]).max() < 1.0


# --------------------------------------------------------------------------- outline onto outline
def test_cutpaste_fills_a_blob_mask_with_the_donor_defect():
    """A dark elliptical donor defect onto an irregular target blob of another shape: the dark
    region follows the painted outline (IoU ≥ 0.7; the donor's own outline pasted by its bbox
    gives less)."""
    donor = np.full((120, 140, 3), 150, np.uint8)
    dmask = np.zeros((120, 140), np.uint8)
    cv2.ellipse(dmask, (70, 60), (40, 18), 15, 0, 360, 255, -1)
    donor[dmask > 0] = 30
    target = np.full((128, 128, 3), 190, np.uint8)
    tmask = mk.random_mask("blob", (128, 128), np.random.default_rng(7))
    for seed in range(3):
        out = C.CutPasteGenerator()(target, tmask, seed=seed, feather=2, donors=[(donor, dmask)])
        dark = rgb_to_lab(out)[..., 0] < rgb_to_lab(target)[..., 0] - 30
        iou = (dark & (tmask > 0)).sum() / (dark | (tmask > 0)).sum()
        assert iou >= 0.7, (seed, iou)


def test_tps_interpolates_its_control_points():
    rng = np.random.default_rng(0)
    src = rng.uniform(10, 90, (12, 2))
    dst = src * 1.3 + 5 + rng.normal(0, 2, src.shape)
    mx, my = C.tps_map(src, dst, (100, 100), reg=1e-6)
    i = np.round(src).astype(int)
    got = np.stack([mx[i[:, 1], i[:, 0]], my[i[:, 1], i[:, 0]]], 1)
    want = dst + (np.round(src) - src) * 1.3                 # read at the rounded pixel
    assert np.abs(got - want).max() < 1.5


def test_cutpaste_seeds_vary_the_warp(food):
    img, donors, mask = food
    outs = [C.CutPasteGenerator()(img, mask, seed=s, donors=donors[:1]) for s in range(4)]
    m = mask > 0
    pair = [np.abs(a[m].astype(float) - b[m]).mean() for i, a in enumerate(outs) for b in outs[i + 1:]]
    assert min(pair) > 2.0, pair


# ------------------------------------------------------------------------------ no clipping
def test_defect_transfer_never_clips_a_bright_lip_on_a_bright_product(food):
    """The over-bright case: the donor's crack shows lighter dough (L ≈ 87 against a crust of
    L ≈ 45, a log ratio of +0.6) and the target is a bright orange (L ≈ 70). Applied as a ratio
    with the intensity gain that took L to 98 and 465–505 pixels to a channel of 255 (a flat
    orange-white). Now: no pixel brighter than the donor's own brightest L (+1), and the
    brightened pixels keep their colour (median chroma ≥ 60 % of the target's there)."""
    img, donors, mask = food
    L_donor = max(float(np.percentile(rgb_to_lab(d)[..., 0][dm > 0], 99.5)) for d, dm in donors)
    lab_in = rgb_to_lab(img)
    region = mk.dilate(mask, 4) > 0
    for seed in range(3):
        out = get_generator("defect-transfer")(img, mask, seed=seed, feather=4, damage_type="crack",
                                               donors=donors)
        lab = rgb_to_lab(out)
        assert lab[..., 0][region].max() <= max(L_donor, lab_in[..., 0][region].max()) + 1.0, seed
        brighter = region & (lab[..., 0] > lab_in[..., 0] + 5)
        assert brighter.sum() > 20                                   # the lip is still there
        chroma = lambda x: np.sqrt((x[..., 1:] ** 2).sum(-1))
        assert np.median(chroma(lab)[brighter]) >= 0.6 * np.median(chroma(lab_in)[brighter])


def test_apply_deviation_bounds_are_soft_and_optional():
    from pipelines import transfer as T
    lab = np.zeros((1, 5, 3), np.float32)
    lab[..., 0] = [20, 40, 60, 80, 95]
    lab[..., 1] = 30.0
    dev = np.zeros((1, 5, 9), np.float32)
    dev[..., 0] = 0.8                                     # +120 % lightness
    dev[..., 6] = np.log(lab[..., 0] + 1)
    free = T.apply_deviation(lab, dev, 8.0)
    bounded = T.apply_deviation(lab, dev, 8.0, L_hi=85.0, C_hi=40.0)
    assert free[0, 3, 0] == 100.0                        # unbounded: clipped at white
    L = bounded[0, :, 0]
    assert (L <= np.maximum(lab[0, :, 0], 85.0) + 1e-4).all() and (np.diff(L) >= 0).all()
    assert L[0] > 20 and L[4] == pytest.approx(95.0)     # brightened below the bound, never darkened
    assert np.allclose(P.soft_ceiling(np.float32([10.0, 50.0]), np.float32([20.0, 20.0]),
                                      np.float32([80.0, 80.0]))[0], 10.0)
