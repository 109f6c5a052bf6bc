"""defect-transfer (pipelines.transfer): the generator contract, seeding and diversity, relative
illumination transfer, the shape fit, errors, and the service with reference donors from a store.

Synthetic arrays plus the demo bottle (assets/demo/bottle) only; every test runs in well under a
second or two on a 2-core CPU."""
from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipelines import masks as mk
from pipelines import transfer as T
from pipelines.color import rgb_to_lab
from pipelines.imageio import read_mask, read_rgb
from pipelines.registry import GENERATORS, get_generator, get_info

ROOT = Path(__file__).resolve().parent.parent
BOTTLE = ROOT / "assets" / "demo" / "bottle"
NAME = "defect-transfer"


def _gen():
    return get_generator(NAME)


def _textured(shape, seed, level=128.0, amp=25.0):
    """A smooth-noise RGB image around ``level`` (no two pixels alike)."""
    rng = np.random.default_rng(seed)
    coarse = cv2.resize(rng.random((6, 6, 3)).astype(np.float32), (shape[1], shape[0]))
    img = level + amp * (coarse - 0.5) * 2 + 6 * (rng.random((*shape, 3)) - 0.5)
    return np.clip(img, 0, 255).astype(np.uint8)


def _synthetic_donors(n=2, seed=0):
    out = []
    for i in range(n):
        img = _textured((80, 96), seed + 10 + i)
        m = mk.random_mask("blob", img.shape, np.random.default_rng(seed + i))
        dark = img.astype(np.float32)
        dark[m > 0] *= 0.35 + 0.1 * i                       # a dark real "defect"
        ring = (mk.dilate(m, 2) > 0) & ~(m > 0)
        dark[ring] = np.minimum(255, dark[ring] * 1.3)      # with a bright lip
        out.append((dark.astype(np.uint8), m))
    return out


def _masks(shape, seed):
    rng = np.random.default_rng(seed)
    h, w = shape
    out = {style: mk.random_mask(style, shape, rng) for style in mk.STYLES}
    edge = np.zeros(shape, np.uint8)
    edge[:, :5] = 255
    out["left-edge"] = edge
    corner = np.zeros(shape, np.uint8)
    cv2.circle(corner, (w - 1, h - 1), 9, 255, -1)
    out["corner"] = corner
    dot = np.zeros(shape, np.uint8)
    dot[h // 2, w // 2] = 255
    out["one-pixel"] = dot
    out["full"] = np.full(shape, 255, np.uint8)
    return out


@pytest.fixture(scope="module")
def bottle():
    img = read_rgb(BOTTLE / "train" / "good" / "000.png")
    donors = {t: [(read_rgb(BOTTLE / "test" / t / f"00{i}.png"),
                   read_mask(BOTTLE / "ground_truth" / t / f"00{i}_mask.png")) for i in (0, 1)]
              for t in ("contamination", "broken_large")}
    return img, donors


# ------------------------------------------------------------------------ registry and options
def test_registered_with_info_and_options():
    assert GENERATORS[NAME] == "pipelines.transfer:DefectTransferGenerator"
    info = get_info(NAME)
    assert info.mode == "damage" and info.needs_donors and info.takes_strength
    specs = {s.name: s for s in info.option_specs}
    assert specs["blend"].choices == ("laplacian", "poisson")
    assert specs["warp"].choices == ("field", "affine")
    assert specs["relight"].choices == ("auto", "ratio", "level")
    assert (specs["jitter"].min, specs["jitter"].max) == (0.0, 1.0)
    assert all(s.help for s in specs.values())
    with pytest.raises(ValueError, match="blend must be one of"):
        specs["blend"].parse("median")


# ------------------------------------------------------------------------------ hard contract
@pytest.mark.parametrize("feather", [0, 3, 7])
def test_pixels_outside_dilated_mask_are_byte_identical(feather):
    img = _textured((72, 88), 1)
    donors = _synthetic_donors()
    for i, (key, mask) in enumerate(_masks(img.shape[:2], feather).items()):
        opts = [dict(), dict(blend="poisson", warp="affine", relight="level")][i % 2]
        out = _gen()(img, mask, seed=i, feather=feather, donors=donors, damage_type="crack", **opts)
        assert out.shape == img.shape and out.dtype == np.uint8
        outside = mk.dilate(mask, feather) == 0
        assert np.array_equal(out[outside], img[outside]), (key, feather)
        if key != "full":
            assert not np.array_equal(out, img), key          # it did something


def test_same_seed_same_bytes_different_seeds_differ(bottle):
    img, donors = bottle
    mask = read_mask(BOTTLE / "ground_truth" / "contamination" / "004_mask.png")
    run = lambda s, **kw: _gen()(img, mask, seed=s, donors=donors["contamination"],
                                 damage_type="contamination", **kw)
    a, b = run(7), run(7)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, run(8))
    assert np.array_equal(run(3, blend="poisson"), run(3, blend="poisson"))


@pytest.mark.parametrize("damage", ["contamination", "broken_large", "broken_small"])
def test_diversity_across_seeds(bottle, damage):
    """Six seeds on one bottle image and one mask (the bottle's evaluation mask 004 of the type),
    the two reference donors of the type, default options. Floor: the mean pairwise L1 inside
    the mask is ≥ 8 grey levels *and* ≥ 0.25 × the mean change the defect makes there (seeds
    must vary the defect, not just its strength), and no two seeds are alike (each pair ≥ 0.08 ×
    the change). Measured: contamination 11.3 / 0.36, broken_large 21.0 / 0.59, broken_small
    26.2 / 0.46. Perlin at a fixed strength of 0.8 is not held to it: its broken style fills the
    hole the same way every time (8.5 / 0.19 on broken_large, 8.4 / 0.12 on broken_small)."""
    img, donors = bottle
    mask = read_mask(BOTTLE / "ground_truth" / damage / "004_mask.png")
    m = mask > 0
    pairs = donors[damage] if damage in donors else [
        (read_rgb(BOTTLE / "test" / damage / f"00{i}.png"),
         read_mask(BOTTLE / "ground_truth" / damage / f"00{i}_mask.png")) for i in (0, 1)]
    outs = [_gen()(img, mask, seed=s, donors=pairs, damage_type=damage) for s in range(6)]
    d = [np.abs(a[m].astype(float) - b[m].astype(float)).mean() for a, b in itertools.combinations(outs, 2)]
    change = np.mean([np.abs(o[m].astype(float) - img[m]).mean() for o in outs])
    assert np.mean(d) >= 8.0 and np.mean(d) >= 0.25 * change, (np.mean(d), change)
    assert min(d) >= 0.08 * change, (min(d), change)


# --------------------------------------------------------------------- illumination transfer
def _scratch_donor():
    """A mid-grey plate (L ≈ 53) with a horizontal dark scratch 40 % below it in L."""
    img = np.full((90, 120, 3), 128, np.uint8)
    lab = rgb_to_lab(img)
    mask = np.zeros(img.shape[:2], np.uint8)
    cv2.line(mask, (20, 45), (100, 47), 255, 5)
    lab[mask > 0, 0] *= 0.6
    from pipelines.color import lab_to_rgb
    return lab_to_rgb(lab), mask


@pytest.mark.parametrize("opts", [dict(jitter=0.0), dict(jitter=0.0, relight="level"),
                                  dict(jitter=0.0, blend="poisson", warp="affine"), dict()])
def test_dark_scratch_is_relative_to_the_targets_lightness(opts):
    """The donor scratch is −40 % in L on mid grey (L 53 → 32). On a bright target (L ≈ 88) it
    must darken by ≈ 40 % of the *target's* L (±15 %: within −34 … −46 %, here with jitter 0 and
    on average over seeds with the default jitter), i.e. to ≈ 53 — not be copied at L 32."""
    donor = _scratch_donor()
    target = _textured((100, 130), 5, level=220.0, amp=8.0)
    mask = np.zeros(target.shape[:2], np.uint8)
    cv2.line(mask, (25, 70), (105, 30), 255, 5)             # a diagonal stroke
    core = mk.erode(mask, 1) > 0
    L_in = rgb_to_lab(target)[..., 0]
    rel = []
    for seed in range(4):
        out = _gen()(target, mask, seed=seed, donors=[donor], damage_type="scratch", **opts)
        L_out = rgb_to_lab(out)[..., 0]
        rel.append(float(np.median(L_out[core] / L_in[core] - 1.0)))
        assert abs(float(np.median(L_out[core])) - 0.6 * 53.4) > 12      # not the donor's L
    assert -0.46 <= np.mean(rel) <= -0.34, rel
    if opts.get("jitter") == 0.0:
        assert np.ptp(rel) < 0.02, rel                                # no intensity jitter


def test_strength_scales_the_deviation(bottle):
    img, donors = bottle
    mask = read_mask(BOTTLE / "ground_truth" / "contamination" / "004_mask.png")
    run = lambda st: _gen()(img, mask, seed=1, donors=donors["contamination"], strength=st,
                            damage_type="contamination")
    change = [np.abs(run(st).astype(float) - img).sum() for st in (0.0, 0.4, 1.0)]
    assert change[0] == 0 and 0 < change[1] < change[2]


# ---------------------------------------------------------------------------------- shape fit
def test_moments_alignment_turns_the_donor_along_the_stroke():
    """A horizontal donor stroke onto a vertical target stroke: the chosen map has IoU > 0.5."""
    donor = np.zeros((60, 80), bool)
    donor[28:32, 10:70] = True
    target = np.zeros((90, 40), bool)
    target[10:80, 18:22] = True
    cands = T.candidate_affines(target, donor)
    _, iou = T.best_affine(target, donor, cands, np.random.default_rng(0))
    assert iou > 0.5


def test_displacement_field_fills_the_target_shape():
    """An ellipse warped onto a bent (L-shaped) stroke: the field raises the overlap."""
    target = np.zeros((80, 80), np.uint8)
    cv2.line(target, (15, 15), (15, 60), 1, 9)
    cv2.line(target, (15, 60), (60, 60), 1, 9)
    target = target > 0
    donor = np.zeros((80, 80), np.uint8)
    cv2.ellipse(donor, (40, 40), (30, 8), 45, 0, 360, 1, -1)
    aff, before = T.best_affine(target, donor > 0, T.candidate_affines(target, donor > 0),
                                np.random.default_rng(0))
    warped = cv2.warpAffine(donor.astype(np.float32), aff, (80, 80),
                            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP) > 0.5
    u = T.displacement_field(target, warped, size=60.0)
    yy, xx = np.mgrid[0:80, 0:80].astype(np.float32)
    pulled = cv2.remap(warped.astype(np.float32), xx + u[..., 0], yy + u[..., 1], cv2.INTER_LINEAR) > 0.5
    iou = lambda a, b: (a & b).sum() / (a | b).sum()
    assert iou(pulled, target) > iou(warped, target) + 0.1, (iou(pulled, target), iou(warped, target))


def test_transferred_defect_stays_in_the_painted_shape():
    """Most of the change (≥ 85 % of |Δ|) lies on the mask, not in the feather ring."""
    donor = _scratch_donor()
    target = _textured((100, 130), 6, level=180.0, amp=8.0)
    mask = np.zeros(target.shape[:2], np.uint8)
    cv2.ellipse(mask, (65, 50), (40, 6), 30, 0, 360, 255, -1)
    out = _gen()(target, mask, seed=0, donors=[donor], damage_type="scratch")
    delta = np.abs(out.astype(float) - target).sum(axis=2)
    assert delta[mask > 0].sum() >= 0.85 * delta.sum()


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("donors", [None, []])
def test_no_donors_is_a_clear_value_error(donors):
    img = _textured((40, 40), 0)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:20, 10:30] = 255
    with pytest.raises(ValueError, match="needs at least one reference real defect"):
        _gen()(img, mask, seed=0, donors=donors, damage_type="scratch")


def test_bad_options_and_donors_are_clear_errors():
    img = _textured((40, 40), 0)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:20, 10:30] = 255
    donors = _synthetic_donors(1)
    with pytest.raises(ValueError, match="unknown blend"):
        _gen()(img, mask, seed=0, donors=donors, blend="median")
    with pytest.raises(ValueError, match="unknown warp"):
        _gen()(img, mask, seed=0, donors=donors, warp="spline")
    with pytest.raises(ValueError, match="donor 0 must be an"):
        _gen()(img, mask, seed=0, donors=[img])
    with pytest.raises(mk.MaskError, match="Donor defect 0"):
        _gen()(img, mask, seed=0, donors=[(img, np.zeros((40, 40), np.uint8))])


# ------------------------------------------------------------------------------------ service
def test_service_with_reference_donors_from_the_store(tmp_path):
    from studio.dataset import Store
    from studio.services import GenerateRequest, UserError, generate
    store = Store(tmp_path / "ws")
    try:
        store.import_mvtec(BOTTLE)
        row = store.list_images(product="bottle", split="train")[0]
        img = store.load_image(row["id"])
        mask = np.zeros(img.shape[:2], np.uint8)
        cv2.ellipse(mask, (150, 70), (22, 12), 20, 0, 360, 255, -1)
        cands = generate(GenerateRequest(image=img, mask=mask, damage_type="contamination",
                                         product="bottle", backend=NAME, n=2, seed=4,
                                         source_image_id=row["id"], options={"blend": "poisson"}),
                         store=store)
        ref = store.reference_defects("bottle", "contamination")
        evaluation = {r["id"] for r in store.list_images(role="evaluation")}
        outside = mk.dilate(mask, 4) == 0
        assert [c.generator for c in cands] == [NAME, NAME]
        assert not np.array_equal(cands[0].image, cands[1].image)
        for c in cands:
            assert np.array_equal(c.image[outside], img[outside])
            rec = store.get_sample(c.sample_id)
            assert rec["generator"] == NAME and rec["params"]["blend"] == "poisson"
            assert rec["params"]["n_donors"] == len(ref) >= 1
            assert sorted(rec["params"]["donor_ids"]) == sorted(r["id"] for r in ref)
            assert not set(rec["params"]["donor_ids"]) & evaluation
            assert set(rec["ancestors"]) == {r["sha256"] for r in ref} | {row["sha256"]}
        with pytest.raises(UserError, match="defect-transfer needs at least one real 'scratch'"):
            generate(GenerateRequest(image=img, mask=mask, damage_type="scratch", backend=NAME), store=None)
    finally:
        store.close()


# --------------------------------------------------------------------------------- blending
def test_blends_keep_the_inside_and_vanish_at_the_border():
    rng = np.random.default_rng(0)
    dev = cv2.GaussianBlur(rng.normal(size=(48, 64, 3)).astype(np.float32), (0, 0), 2)
    omega = np.zeros((48, 64), bool)
    omega[8:40, 10:54] = True
    # multi-band: weight 1 everywhere reconstructs the input, 0 gives nothing
    assert np.allclose(T.multiband(dev, np.ones((48, 64), np.float32)), dev, atol=1e-4)
    assert np.allclose(T.multiband(dev, np.zeros((48, 64), np.float32)), 0, atol=1e-6)
    # Poisson: 0 outside Ω, the Laplacian of the deviation kept inside (away from the border)
    out = T.poisson(dev, omega)
    assert np.abs(out[~omega]).max() == 0
    lap = lambda x: cv2.Laplacian(x, cv2.CV_32F)
    inner = mk.erode(omega.astype(np.uint8) * 255, 1) > 0
    assert np.abs(lap(out) - lap(dev))[inner].max() < 1e-3
    ring = omega & ~(mk.erode(omega.astype(np.uint8) * 255, 1) > 0)   # next to the border: ≈ 0
    assert np.abs(out[ring]).mean() < 0.5 * np.abs(dev[ring]).mean()
