"""``stroke`` (pipelines.generators.stroke): the generator contract, a thin painted line gives a thin
defect along the whole line, profiles learned from reference defects (and cached), the default
profiles per style, bounds, errors.

Synthetic arrays plus the demo images (assets/demo); every test runs in about a second or less on a
2-core CPU."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage.morphology import skeletonize

from pipelines import masks as mk
from pipelines.color import rgb_to_lab
from pipelines.generators import profiles as P
from pipelines.imageio import read_mask, read_rgb
from pipelines.registry import GENERATORS, get_generator, get_info

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo"
NAME = "stroke"


def _gen():
    return get_generator(NAME)


def _textured(shape, seed, level=150.0, amp=20.0):
    rng = np.random.default_rng(seed)
    coarse = cv2.resize(rng.random((6, 6, 3)).astype(np.float32), (shape[1], shape[0]))
    img = level + amp * (coarse - 0.5) * 2 + 6 * (rng.random((*shape, 3)) - 0.5)
    return np.clip(img, 0, 255).astype(np.uint8)


def _line(shape, p0, p1, width=3):
    m = np.zeros(shape, np.uint8)
    cv2.line(m, p0, p1, 255, width)
    return m


def _donor_with_profile(factor: float, width: int = 7, seed: int = 0):
    """A plate with a horizontal band whose L is ``factor`` × the plate's (its mask = the band)."""
    from pipelines.color import lab_to_rgb
    img = _textured((90, 120), seed, level=140.0, amp=6.0)
    m = np.zeros(img.shape[:2], np.uint8)
    cv2.line(m, (15, 45), (105, 47), 255, width)
    lab = rgb_to_lab(img)
    lab[m > 0, 0] *= factor
    return lab_to_rgb(lab), m


def _masks(shape):
    rng = np.random.default_rng(3)
    h, w = shape
    out = {style: mk.random_mask(style, shape, rng) for style in mk.STYLES}
    out["line3"] = _line(shape, (5, h - 8), (w - 6, 6))
    edge = np.zeros(shape, np.uint8)
    edge[:, :4] = 255
    out["left-edge"] = edge
    corner = np.zeros(shape, np.uint8)
    cv2.circle(corner, (w - 1, h - 1), 9, 255, -1)
    out["corner"] = corner
    dot = np.zeros(shape, np.uint8)
    dot[h // 2, w // 2] = 255
    out["one-pixel"] = dot
    top = np.zeros(shape, np.uint8)
    top[0, w // 3: w // 2] = 255
    out["top-line"] = top
    out["full"] = np.full(shape, 255, np.uint8)
    return out


@pytest.fixture(scope="module")
def metal():
    img = read_rgb(DEMO / "brushed_metal" / "train" / "good" / "000.png")
    donors = [(read_rgb(DEMO / "brushed_metal" / "test" / "crack" / f"00{i}.png"),
               read_mask(DEMO / "brushed_metal" / "ground_truth" / "crack" / f"00{i}_mask.png")) for i in (0, 1)]
    return img, donors


# ------------------------------------------------------------------------ registry and options
def test_registered_learns_from_donors_without_needing_them():
    assert GENERATORS[NAME] == "pipelines.generators.stroke:StrokeGenerator"
    info = get_info(NAME)
    assert info.mode == "damage" and info.learns_from_donors and not info.needs_donors
    assert info.takes_donors and info.takes_strength and not info.full_image
    specs = {s.name: s for s in info.option_specs}
    assert {"style", "learn", "width", "contrast", "rim", "taper", "branches", "jitter"} <= set(specs)
    assert specs["style"].choices == mk.STYLES and all(s.help for s in specs.values())
    assert specs["branches"].parse("") is None and specs["width"].parse("0.5") == 0.5


# ------------------------------------------------------------------------------ hard contract
@pytest.mark.parametrize("feather", [0, 3, 7])
@pytest.mark.parametrize("with_donors", [False, True])
def test_pixels_outside_dilated_mask_are_byte_identical(feather, with_donors):
    img = _textured((72, 88), 1)
    donors = [_donor_with_profile(0.5)] if with_donors else None
    for i, (key, mask) in enumerate(_masks(img.shape[:2]).items()):
        before = img.copy()
        kw = {"donors": donors} if donors else {}
        out = _gen()(img, mask, seed=i, feather=feather, damage_type=("crack", "scratch", "cut")[i % 3], **kw)
        np.testing.assert_array_equal(img, before, err_msg="input modified in place")
        assert out.shape == img.shape and out.dtype == np.uint8
        outside = mk.dilate(mask, feather) == 0
        assert np.array_equal(out[outside], img[outside]), (key, feather)
        assert not np.array_equal(out[mask > 0], img[mask > 0]), key      # it did something


@pytest.mark.parametrize("with_donors", [False, True])
def test_same_seed_same_bytes_different_seeds_differ(metal, with_donors):
    img, donors = metal
    mask = _line(img.shape[:2], (40, 200), (210, 50))
    kw = {"donors": donors} if with_donors else {}
    run = lambda s: _gen()(img, mask, seed=s, damage_type="crack", **kw)
    a = run(5)
    assert np.array_equal(a, run(5))
    outs = [run(s) for s in (6, 7, 8)]
    assert all(not np.array_equal(a, o) for o in outs)
    m = mk.dilate(mask, 2) > 0
    pair = np.abs(a[m].astype(float) - outs[0][m]).mean()
    assert pair > 1.0, pair                               # the defect itself varies, not one pixel


# ------------------------------------------------------------------- a thin line, a thin defect
def _changed(out, img, level=8):
    return np.abs(out.astype(int) - img.astype(int)).max(axis=2) >= level


@pytest.mark.parametrize("damage", ["crack", "scratch", "cut", "contamination"])
@pytest.mark.parametrize("feather", [2, 4])
def test_3px_line_gives_a_thin_defect_along_the_whole_line(metal, damage, feather):
    """A 3 px painted line: the changed pixels lie in the line dilated by the feather radius (the
    contract) and cover ≥ 60 % of its skeleton (measured: 0.97–1.00); the change is a line, not
    noise: ≥ 90 % of it (|Δ| summed) within 2 px of the line, its sign is the same along ≥ 85 %
    of the skeleton, and the cross-section peaks on the skeleton."""
    img, _ = metal
    mask = _line(img.shape[:2], (30, 210), (220, 40))
    skel = skeletonize(mask > 0)
    for seed in range(3):
        out = _gen()(img, mask, seed=seed, feather=feather, damage_type=damage)
        changed = _changed(out, img)
        assert not (changed & (mk.dilate(mask, feather) == 0)).any()
        cover = changed[skel].mean()
        assert cover >= 0.6, (damage, seed, cover)
        dL = rgb_to_lab(out)[..., 0] - rgb_to_lab(img)[..., 0]
        near = mk.dilate(mask, 2) > 0
        assert np.abs(dL)[near].sum() >= 0.9 * np.abs(dL).sum()
        on = dL[skel]
        sign = np.sign(np.median(on))
        assert (np.sign(on) == sign).mean() >= 0.85, (damage, seed)
        ring = (mk.dilate(mask, 3) > 0) & ~(mk.dilate(mask, 1) > 0)
        assert np.abs(dL[skel]).mean() >= 2.0 * np.abs(dL[ring]).mean()


def test_wide_mask_is_a_stroke_of_its_local_width():
    """A 15 px band gives a defect as wide as the band (the core spans several pixels across),
    a 3 px line a thin one."""
    img = _textured((100, 140), 2)
    thin = _line(img.shape[:2], (10, 50), (130, 50), 3)
    wide = _line(img.shape[:2], (10, 50), (130, 50), 15)
    widths = []
    for m in (thin, wide):
        out = _gen()(img, m, seed=0, feather=3, damage_type="crack", jitter=0.0)
        col = _changed(out, img, 12)[:, 70]
        widths.append(int(col.sum()))
    assert widths[0] <= 5 and widths[1] >= 3 * widths[0], widths


def test_ends_taper():
    """Over the last 10 % of a long line the defect is weaker than in its middle."""
    img = np.full((60, 220, 3), 170, np.uint8)
    m = _line(img.shape[:2], (10, 30), (210, 30), 5)
    out = _gen()(img, m, seed=0, feather=2, damage_type="crack", jitter=0.0, taper=0.3)
    d = np.abs(out.astype(float) - img).sum(axis=2)
    middle, end = d[20:41, 100:120].sum(), d[20:41, 200:220].sum()
    assert end < 0.7 * middle, (end, middle)
    flat = _gen()(img, m, seed=0, feather=2, damage_type="crack", jitter=0.0, taper=0.0)
    assert np.abs(flat.astype(float) - img).sum(axis=2)[20:41, 200:220].sum() > end


def test_branches_leave_the_skeleton_in_a_wide_mask():
    img = _textured((120, 160), 4)
    m = _line(img.shape[:2], (15, 60), (145, 60), 21)
    none = _gen()(img, m, seed=1, damage_type="crack", branches=0.0)
    many = _gen()(img, m, seed=1, damage_type="crack", branches=8.0)
    assert not np.array_equal(none, many)
    off_core = (mk.dilate(m, 0) > 0) & (np.abs(np.arange(120) - 60) > 5)[:, None]
    assert _changed(many, img, 15)[off_core].sum() > _changed(none, img, 15)[off_core].sum()


# -------------------------------------------------------------------------------- profiles
def test_measured_profile_recovers_the_reference_cross_section():
    """A reference band at 50 % of the plate's L: log_l at the centre ≈ log(0.5 L + 1)/(L + 1)
    (within 0.1), ≈ 0 far outside, the bounds are the reference's own."""
    img, m = _donor_with_profile(0.5)
    prof = P.measure_profile(img, m > 0)
    L = float(np.median(rgb_to_lab(img)[m == 0][:, 0]))
    expect = np.log((0.5 * L + 1) / (L + 1))
    assert abs(prof.sym[0, 0] - expect) < 0.1, (prof.sym[:, 0], expect)
    assert abs(prof.sym[-1, 0]) < 0.05
    assert prof.log_l_range[0] < expect + 0.1 and prof.L_hi is not None
    bright = P.measure_profile(*_donor_with_profile(1.4))
    assert bright.sym[0, 0] > 0.2 and bright.core_sign() > 0


def test_learns_polarity_from_references_and_works_without():
    """Dark references give a dark defect, bright ones a bright defect; without donors the crack
    default is dark."""
    img = _textured((80, 120), 6, level=120.0, amp=5.0)
    mask = _line(img.shape[:2], (10, 60), (110, 20), 5)
    core = mk.erode(mask, 1) > 0
    L0 = rgb_to_lab(img)[..., 0][core].mean()
    for donors, sign in (([_donor_with_profile(0.5)], -1), ([_donor_with_profile(1.5)], +1), (None, -1)):
        kw = {"donors": donors} if donors else {}
        out = _gen()(img, mask, seed=0, damage_type="crack", **kw)
        dL = rgb_to_lab(out)[..., 0][core].mean() - L0
        assert np.sign(dL) == sign and abs(dL) > 5, (sign, dL)
    off = _gen()(img, mask, seed=0, damage_type="crack", donors=[_donor_with_profile(1.5)], learn=False)
    assert rgb_to_lab(off)[..., 0][core].mean() < L0 - 5                  # learn=False: the default


def test_profiles_are_cached_per_donor(monkeypatch):
    calls = []
    real = P.measure_profile
    monkeypatch.setattr(P, "measure_profile", lambda *a: calls.append(1) or real(*a))
    donors = [_donor_with_profile(0.55, seed=11), _donor_with_profile(0.6, seed=12)]
    img = _textured((64, 64), 0)
    mask = _line(img.shape[:2], (5, 50), (60, 10))
    for s in range(3):
        _gen()(img, mask, seed=s, damage_type="crack", donors=donors)
    assert len(calls) == 2                                 # once per donor, not per call
    changed = [(donors[0][0].copy(), donors[0][1]), donors[1]]
    changed[0][0][0, 0] ^= 1                               # one byte different: a new donor
    _gen()(img, mask, seed=0, damage_type="crack", donors=changed)
    assert len(calls) == 3


@pytest.mark.parametrize("style", ["crack", "scratch", "broken", "blob", "color"])
def test_every_default_style_changes_the_stroke(style):
    img = _textured((70, 100), 8)
    mask = _line(img.shape[:2], (8, 60), (92, 10), 5)
    out = _gen()(img, mask, seed=2, style=style)
    assert np.abs(out.astype(float) - img)[mask > 0].mean() > 3.0, style


def test_brightening_is_bounded_by_the_reference():
    """A bright reference on a bright target: no pixel gets brighter than the reference's own
    brightest lightness (+1), nothing turns into a clipped white."""
    img = _textured((80, 120), 9, level=215.0, amp=6.0)
    donor = _donor_with_profile(1.45)
    mask = _line(img.shape[:2], (10, 60), (110, 20), 5)
    L_hi = P.measure_profile(donor[0], donor[1] > 0).L_hi
    for s in range(3):
        out = _gen()(img, mask, seed=s, damage_type="scratch", donors=[donor], contrast=2.0)
        L = rgb_to_lab(out)[..., 0]
        assert L.max() <= max(L_hi, rgb_to_lab(img)[..., 0].max()) + 1.0


# ------------------------------------------------------------------------------------- errors
def test_errors_are_clear():
    img = _textured((40, 40), 0)
    mask = _line(img.shape[:2], (5, 35), (35, 5))
    with pytest.raises(ValueError, match="style must be one of|unknown defect style"):
        _gen()(img, mask, seed=0, style="splash")
    with pytest.raises(ValueError, match="donor 0 must be an"):
        _gen()(img, mask, seed=0, donors=[img])
    with pytest.raises(mk.MaskError, match="Donor defect 0"):
        _gen()(img, mask, seed=0, donors=[(img, np.zeros((40, 40), np.uint8))])
    with pytest.raises(mk.MaskError, match="empty"):
        _gen()(img, np.zeros((40, 40), np.uint8), seed=0)


def test_service_passes_reference_donors_and_works_without(tmp_path):
    from studio.dataset import Store
    from studio.services import GenerateRequest, generate
    img = read_rgb(DEMO / "brushed_metal" / "train" / "good" / "000.png")
    mask = _line(img.shape[:2], (40, 200), (210, 50))
    cands = generate(GenerateRequest(image=img, mask=mask, damage_type="crack", backend=NAME, n=2, seed=1))
    assert [c.generator for c in cands] == [NAME, NAME]
    store = Store(tmp_path / "ws")
    try:
        store.import_mvtec(DEMO / "brushed_metal")
        row = store.list_images(product="brushed_metal", split="train")[0]
        cands = generate(GenerateRequest(image=store.load_image(row["id"]), mask=mask, damage_type="crack",
                                         product="brushed_metal", backend=NAME, n=1, seed=1,
                                         source_image_id=row["id"]), store=store)
        rec = store.get_sample(cands[0].sample_id)
        ref = store.reference_defects("brushed_metal", "crack")
        assert rec["generator"] == NAME and rec["params"].get("n_donors") == len(ref) >= 1
        assert {r["sha256"] for r in ref} <= set(rec["ancestors"])
    finally:
        store.close()
