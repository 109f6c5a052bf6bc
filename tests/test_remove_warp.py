"""``remove`` and ``warp`` (pipelines/generators/remove.py, warp.py; shared code in align.py):
the contract on toy scenes — a bright bar (a lead, a thread) on a plain, slightly noisy
background — and what each promises: a removed band leaves background, a cut's far end moves,
warp moves the bar's pixels along its field, the fitted bend recovers a known bend, a good image
identical to the target is ignored, and without goods the inpaint fallback works."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from pipelines import masks as mk
from pipelines.generators import align as A
from pipelines.generators import fill as F
from pipelines.generators import warp as W
from pipelines.registry import GENERATORS, get_generator, get_info

BG, BAR = 90, 220
S = 256


def scene(seed: int = 0, x: int = 128, bend: float = 0.0, pivot_y: int = 120, width: int = 6,
          shift: tuple[int, int] = (0, 0)) -> np.ndarray:
    """A plain grey background (noise σ 2) with a vertical bright bar from y = 40 to 200 at
    ``x``; below ``pivot_y`` the bar is turned by ``bend`` degrees (clockwise) about
    ``(x, pivot_y)``. ``shift`` moves everything (another photo of the product)."""
    rng = np.random.default_rng(seed)
    img = np.clip(BG + rng.normal(0, 2, (S, S, 3)), 0, 255).astype(np.uint8)
    x += shift[0]
    py = pivot_y + shift[1]
    top, bottom = 40 + shift[1], 200 + shift[1]
    cv2.line(img, (x, top), (x, py), (BAR,) * 3, width)
    a = math.radians(bend)
    end = (int(round(x - (bottom - py) * math.sin(a))), int(round(py + (bottom - py) * math.cos(a))))
    cv2.line(img, (x, py), end, (BAR,) * 3, width)
    return img


def rect(y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((S, S), np.uint8)
    m[y0:y1, x0:x1] = 255
    return m


GOODS = [scene(s, shift=(dx, dy)) for s, (dx, dy) in enumerate([(2, 1), (-3, 2), (1, -2), (4, 0)], 1)]


def bar_pixels(img: np.ndarray, m: np.ndarray) -> int:
    return int(((img[..., 0] > (BG + BAR) / 2) & (m > 0)).sum())


def test_registered_with_info():
    assert GENERATORS["warp"] == "pipelines.generators.warp:WarpGenerator"
    assert GENERATORS["remove"] == "pipelines.generators.remove:RemoveGenerator"
    for name in ("warp", "remove"):
        info = get_info(name)
        assert info.needs_goods and info.mode == "damage" and not info.full_image
    assert get_info("warp").learns_from_donors and get_info("warp").takes_donors
    assert not get_info("warp").needs_donors


@pytest.mark.parametrize("name,kw", [("remove", {"damage_type": "cut_lead"}),
                                     ("remove", {"damage_type": "missing", "fill": "inpaint"}),
                                     ("warp", {"damage_type": "bent_lead"}),
                                     ("warp", {"damage_type": "misplaced"}),
                                     ("warp", {"damage_type": "dent", "motion": "elastic"})])
@pytest.mark.parametrize("goods", [True, False])
def test_outside_mask_bytes_identical_and_seeded(name, kw, goods):
    img = scene(0)
    m = rect(140, 210, 110, 150)
    gen = get_generator(name)
    extra = {"goods": GOODS} if goods else {}
    outs = [gen(img, m, seed=s, feather=3, **kw, **extra) for s in range(3)]
    outside = mk.dilate(m, 3) == 0
    for o in outs:
        assert o.shape == img.shape and o.dtype == np.uint8
        assert np.array_equal(o[outside], img[outside])
        assert np.abs(o.astype(int) - img).sum() > 0           # it did something
    assert np.array_equal(outs[0], gen(img, m, seed=0, feather=3, **kw, **extra))
    if kw.get("fill") != "inpaint":
        assert not np.array_equal(outs[0], outs[1]) or not np.array_equal(outs[1], outs[2])


def test_seeds_vary_the_defect():
    img = scene(0)
    m = rect(120, 215, 95, 165)
    for name, dt, floor in (("warp", "bent_lead", 3.0), ("remove", "cut_lead", 0.5)):
        gen = get_generator(name)     # (a removal varies less: the background is what it is)
        outs = [gen(img, m, seed=s, goods=GOODS, damage_type=dt).astype(float) for s in range(5)]
        pair = np.mean([np.abs(a - b)[m > 0].mean() for i, a in enumerate(outs) for b in outs[i + 1:]])
        assert pair > floor, (name, pair)


def test_a_good_identical_to_the_target_is_ignored():
    img = scene(0)
    near = img.copy()
    near[5:9, 5:9] = 0                                   # a near-identical copy
    assert [i for i, _ in A.nearest_goods(img, [img, near, GOODS[0]])] == [2]
    assert A.align_goods(img, [img, near]) == []
    m = rect(140, 210, 110, 150)
    gen = get_generator("remove")
    alone = gen(img, m, seed=3, damage_type="missing")
    with_copies = gen(img, m, seed=3, damage_type="missing", goods=[img, near])
    assert np.array_equal(alone, with_copies)            # the copies were not used


@pytest.mark.parametrize("fill", ["auto", "inpaint"])
def test_no_goods_falls_back_and_removes_the_bar(fill):
    img = scene(0)
    m = rect(150, 215, 110, 150)                         # the bar's lower end
    out = get_generator("remove")(img, m, seed=0, damage_type="missing", fill=fill)
    assert bar_pixels(img, m) > 200 and bar_pixels(out, m) == 0
    inside = out[mk.erode(m, 3) > 0].astype(float)
    assert abs(inside.mean() - BG) < 8                   # background, not a smear of the bar


def test_inpaint_fallback_when_no_background_source():
    """No source can cover the region (the background is too small around it): cv2.inpaint."""
    img = scene(0)
    region = mk.dilate(rect(150, 200, 120, 136), 1) > 0
    srcs = [F.Source(img, np.zeros(region.shape, bool), True)]
    res = F.fill_background(img, region, np.zeros(region.shape, bool), srcs, np.random.default_rng(0))
    assert res.inpainted == 1.0 and res.pieces == 0
    assert np.isfinite(res.image).all()


def test_cut_leaves_background_in_the_band_and_shifts_the_far_end():
    img = scene(0)
    m = rect(100, 160, 100, 156)                         # a band across the bar (it goes on both sides)
    gen = get_generator("remove")
    shifted = 0
    for seed in range(4):
        out = gen(img, m, seed=seed, goods=GOODS, damage_type="cut", feather=2)
        bright = out[..., 0] > (BG + BAR) / 2
        rows = [y for y in range(100, 160) if not bright[y, 100:156].any()]
        assert len(rows) >= 15, "no removed band"         # rows of the band: background only
        band = out[rows[0]:rows[-1] + 1, 100:156].astype(float)
        assert abs(band.mean() - BG) < 8
        # the far end (inside the mask, past the band): the bar is there, moved sideways
        far = [y for y in range(rows[-1] + 1, 156) if bright[y, 100:156].any()]
        near = [y for y in range(101, rows[0]) if bright[y, 100:156].any()]
        piece = far if len(far) >= len(near) else near
        assert piece, "the far end is gone"
        centre = np.mean([np.flatnonzero(bright[y, 100:156]).mean() + 100 for y in piece[:max(1, len(piece) // 2)]])
        shifted = max(shifted, abs(centre - 128))
    assert shifted >= 2.0, shifted


def test_warp_moves_the_bar_along_the_field():
    """A bend of θ about the pivot where the bar enters the mask: the bar's tip moves sideways by
    about L·sin θ (L: tip − pivot), the bar's pixels stay a bar (about as many), and the place
    the tip left shows background."""
    img = scene(0)
    m = rect(120, 215, 80, 176)
    theta = 20.0
    fit = W.Fit(True, bend=theta, bend_iou=0.9, base_iou=0.1, extent=80)
    out = np.clip(W.warp(img, m > 0, np.random.default_rng(0), fits=[fit], jitter=0.0, strength=0.8,
                         damage_type="bent_lead"), 0, 255).astype(np.uint8)
    bright = out[..., 0] > (BG + BAR) / 2
    tip_row = 190                                         # 70 px below the pivot (y = 120)
    xs = np.flatnonzero(bright[tip_row])
    assert xs.size, "no bar at the tip row"
    moved_by = abs(xs.mean() - 128)
    expected = 70 * math.tan(math.radians(theta))
    assert abs(moved_by - expected) < 6, (moved_by, expected)
    assert not bright[tip_row, 125:132].any()            # the old place: background
    before, after = bar_pixels(img, m), bar_pixels(out, m)
    assert 0.75 * before < after < 1.25 * before


@pytest.mark.parametrize("theta", [-45.0, 30.0])
def test_a_bend_without_a_donor_turns_the_lead_into_the_painted_place(theta):
    """A bent-lead mask covers the lead's *new* place: painted along a lead turned by θ about the
    pivot (y = 120), the lead beyond the pivot — also the part of it outside the mask — is turned
    until it fills the mask, so the mask shows a lead where there was board."""
    img = scene(0)
    new_place = scene(0, bend=theta)
    line = (new_place[..., 0] > (BG + BAR) / 2) & ~(img[..., 0] > (BG + BAR) / 2)
    m = (mk.dilate(line & (np.mgrid[0:S, 0:S][0] > 126), 5) > 0)
    before = bar_pixels(img, m.astype(np.uint8))
    out = np.clip(W.warp(img, m, np.random.default_rng(0), jitter=0.0, strength=0.8, damage_type="bent_lead"),
                  0, 255).astype(np.uint8)
    after = bar_pixels(out, m.astype(np.uint8))
    near_line = (mk.dilate(line, 3) > 0) & m        # the pivot is found where the lead enters the mask
    covered = ((out[..., 0] > (BG + BAR) / 2) & near_line).sum() / max(1, (line & m).sum())
    assert covered > 0.4 and after > 2 * before + 20, (covered, before, after)


@pytest.mark.parametrize("theta", [-18.0, 25.0])
def test_fitted_bend_recovers_a_known_bend(theta):
    ref = scene(7, bend=theta)
    straight = scene(7)
    m = ((np.abs(ref.astype(int) - straight).max(2) > 40) | (straight[..., 0] > 150)) & (
        np.mgrid[0:S, 0:S][0] > 122)
    m = mk.dilate(m, 3) > 0
    fit = W.fit_donor(ref, m, GOODS)
    assert fit.measured
    assert abs(abs(fit.bend) - abs(theta)) <= 6, fit
    # and the generator, learning from that reference, bends a straight bar by about as much
    out = get_generator("warp")(scene(0), rect(120, 215, 70, 186), seed=1, goods=GOODS, damage_type="bent_lead",
                                donors=[(ref, m.astype(np.uint8) * 255)], jitter=0.0, strength=0.8)
    bright = out[..., 0] > (BG + BAR) / 2
    xs = np.flatnonzero(bright[190])
    assert xs.size and abs(abs(xs.mean() - 128) - 70 * math.tan(math.radians(abs(theta)))) < 8


def test_bad_options_fail_fast():
    img, m = scene(0), rect(140, 210, 110, 150)
    with pytest.raises(ValueError, match="mode"):
        get_generator("remove")(img, m, seed=0, mode="nope")
    with pytest.raises(ValueError, match="motion"):
        get_generator("warp")(img, m, seed=0, motion="nope")
    with pytest.raises(TypeError, match="unknown parameter"):
        get_generator("remove")(img, m, seed=0, donors=[])   # remove takes no donors


def test_goods_in_another_orientation_are_registered_and_unrelated_ones_skipped():
    """A product lying in another orientation: the rotation search registers it; an image of
    something else does not align and is not used (the generator still runs)."""
    img = scene(0)
    turned = np.ascontiguousarray(np.rot90(scene(5, shift=(3, -2))))
    al = A.align_goods(img, [turned], k=1)
    assert len(al) == 1 and al[0].score >= A.MIN_ECC
    bar = img[..., 0] > (BG + BAR) / 2
    assert (al[0].image[..., 0][bar] > (BG + BAR) / 2).mean() > 0.8     # the bar lands on the bar
    noise = np.random.default_rng(1).integers(0, 255, (S, S, 3), dtype=np.uint8)
    assert A.align_goods(img, [noise]) == []
    m = rect(150, 215, 110, 150)
    out = get_generator("remove")(img, m, seed=0, damage_type="missing", goods=[noise])
    assert bar_pixels(out, m) == 0
