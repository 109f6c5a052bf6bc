"""Classical generators: the hard contract (outside-mask identity, seeding), styles, cut-paste,
and wall colour accuracy on real photos (skimage's bundled samples)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipelines.registry import get_generator
from skimage import data

from pipelines import classical as C
from pipelines import masks as mk
from pipelines.color import color_metrics, rgb_to_lab
from pipelines.masks import MaskError

WALL_COLORS = ("#3366cc", "#c0392b", "#e8d8b0", "#2e7d32")


def _image(shape, seed):
    """Random but structured RGB image (smooth noise + fine noise)."""
    rng = np.random.default_rng(seed)
    coarse = cv2.resize(rng.random((8, 8, 3)).astype(np.float32), (shape[1], shape[0]))
    img = 200 * coarse + 55 * rng.random((*shape, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _donors(seed=0, n=2):
    out = []
    for i in range(n):
        img = _image((72, 90), seed + 100 + i)
        m = mk.random_mask("blob", img.shape, np.random.default_rng(seed + i))
        img[m > 0] = img[m > 0] // 4          # a dark "real" defect
        out.append((img, m))
    return out


def _params(name, seed=0):
    return {"perlin": {"damage_type": "crack"},
            "cutpaste": {"donors": _donors(seed)},
            "wall-lab": {"color": "#3366cc"}}[name]


def _masks(shape, seed):
    """Random masks of every style plus masks touching the border and the corners."""
    rng = np.random.default_rng(seed)
    h, w = shape
    out = {style: mk.random_mask(style, shape, rng) for style in mk.STYLES}
    edge = np.zeros(shape, np.uint8)
    edge[:, :5] = 255                                 # a stripe along the left border
    out["left-edge"] = edge
    corner = np.zeros(shape, np.uint8)
    cv2.circle(corner, (w - 1, h - 1), 9, 255, -1)    # a disc cut by the bottom-right corner
    out["corner"] = corner
    top = np.zeros(shape, np.uint8)
    top[0, w // 3: w // 2] = 255                       # a 1-px line on the top row
    out["top-line"] = top
    full = np.full(shape, 255, np.uint8)               # the whole image
    out["full"] = full
    return out


# ------------------------------------------------------------------------------------ registry
def test_registry_and_metadata():
    from pipelines.registry import generator_class, get_generator, get_info, offline_names
    assert {"perlin", "cutpaste", "wall-lab"} <= set(offline_names("damage")) | set(offline_names("color"))
    for name in ("perlin", "cutpaste", "wall-lab"):
        gen = get_generator(name)
        assert isinstance(gen, generator_class(name)) and gen.name == name == get_info(name).name
        assert isinstance(gen.version, str) and gen.version
    assert get_info("cutpaste").needs_donors and not get_info("perlin").needs_donors
    assert get_info("wall-lab").mode == "color" and get_info("perlin").default_strength == 0.8
    with pytest.raises(KeyError) as exc:
        get_generator("stable-diffusion")
    assert "perlin" in str(exc.value) and "cutpaste" in str(exc.value) and "wall-lab" in str(exc.value)


# ------------------------------------------------------------------------------- hard contract
@pytest.mark.parametrize("name", ["perlin", "cutpaste", "wall-lab"])
@pytest.mark.parametrize("feather", [0, 4, 7])
def test_outside_dilated_mask_is_byte_identical(name, feather):
    gen = get_generator(name)
    for seed, shape in ((0, (64, 80)), (1, (97, 61))):
        img = _image(shape, seed)
        for kind, m in _masks(shape, seed).items():
            before = img.copy()
            out = gen(img, m, seed=seed, feather=feather, **_params(name, seed))
            np.testing.assert_array_equal(img, before, err_msg="input modified in place")
            assert out.shape == img.shape and out.dtype == np.uint8
            outside = mk.dilate(m, feather) == 0
            assert np.array_equal(out[outside], img[outside]), f"{name}/{kind}: outside changed"
            assert not np.array_equal(out[m > 0], img[m > 0]), f"{name}/{kind}: nothing changed"


@pytest.mark.parametrize("name", ["perlin", "cutpaste", "wall-lab"])
def test_seeding(name):
    gen = get_generator(name)
    img = _image((80, 96), 3)
    for style in ("blob", "scratch", "broken"):
        m = mk.random_mask(style, img.shape, np.random.default_rng(5))
        params = _params(name, 1)
        a = gen(img, m, seed=11, **params)
        b = gen(img, m, seed=11, **params)
        c = gen(img, m, seed=12, **params)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c), f"{name}: seeds 11 and 12 gave the same output"


@pytest.mark.parametrize("name", ["perlin", "cutpaste", "wall-lab"])
def test_input_errors(name):
    gen = get_generator(name)
    img = _image((32, 40), 0)
    with pytest.raises(MaskError, match="empty"):
        gen(img, np.zeros((32, 40), np.uint8), seed=0, **_params(name))
    with pytest.raises(MaskError, match="40×32 px"):
        gen(img, np.full((20, 20), 255, np.uint8), seed=0, **_params(name))
    with pytest.raises(TypeError, match="unknown parameter"):
        gen(img, np.full((32, 40), 255, np.uint8), seed=0, bogus=1, **_params(name))
    with pytest.raises(ValueError, match="uint8"):
        gen(img.astype(np.float32), np.full((32, 40), 255, np.uint8), seed=0, **_params(name))


# ------------------------------------------------------------------------------------- perlin
@pytest.mark.parametrize("style", mk.STYLES)
def test_perlin_styles_change_the_masked_region(style):
    img = np.full((96, 96, 3), 150, np.uint8)
    img[..., 2] = 170
    m = mk.random_mask(style, img.shape[:2], np.random.default_rng(2))
    out = C.PerlinDefectGenerator()(img, m, seed=4, style=style)
    diff = np.abs(out.astype(int) - img.astype(int)).sum(axis=2)
    assert diff[m > 0].mean() > 20, f"{style}: defect too faint"
    weak = C.PerlinDefectGenerator()(img, m, seed=4, style=style, strength=0.2)
    assert np.abs(weak.astype(int) - img).sum(axis=2)[m > 0].mean() < diff[m > 0].mean()
    if style in ("crack", "broken"):
        assert out[m > 0].mean() < img[m > 0].mean() - 20     # dark
    with pytest.raises(ValueError, match="known: scratch"):
        C.PerlinDefectGenerator()(img, m, seed=0, style="splash")


def test_perlin_style_defaults_to_the_damage_type():
    img = _image((64, 64), 9)
    m = mk.random_mask("blob", img.shape[:2], np.random.default_rng(0))
    gen = C.PerlinDefectGenerator()
    np.testing.assert_array_equal(gen(img, m, seed=1, damage_type="crack"),
                                  gen(img, m, seed=1, style="crack"))


# ----------------------------------------------------------------------------------- cut-paste
def test_cutpaste_needs_donors():
    img = _image((32, 32), 0)
    m = np.full((32, 32), 255, np.uint8)
    for donors in (None, []):
        with pytest.raises(ValueError, match="cut-paste needs at least one real defect of this type "
                                             "in the dataset"):
            C.CutPasteGenerator()(img, m, seed=0, donors=donors, damage_type="crack")
    with pytest.raises(MaskError, match="Donor defect 0"):
        C.CutPasteGenerator()(img, m, seed=0, donors=[(img, np.zeros((32, 32), np.uint8))])
    with pytest.raises(ValueError, match="known: normal, mixed"):
        C.CutPasteGenerator()(img, m, seed=0, donors=_donors(), clone="magic")


def test_cutpaste_transplants_the_donor_defect():
    # Donor: flat grey with a dark disc. Target: flat light surface, mask on a disc elsewhere.
    donor = np.full((120, 100, 3), 128, np.uint8)
    dmask = np.zeros((120, 100), np.uint8)
    cv2.circle(dmask, (30, 80), 14, 255, -1)
    donor[dmask > 0] = 20
    target = np.full((90, 110, 3), 200, np.uint8)
    tmask = np.zeros((90, 110), np.uint8)
    cv2.circle(tmask, (70, 40), 20, 255, -1)
    for clone in ("normal", "mixed"):
        out = C.CutPasteGenerator()(target, tmask, seed=3, donors=[(donor, dmask)], clone=clone)
        core = mk.erode(tmask, 8) > 0
        assert out[core].mean() < target[core].mean() - 60, clone   # the dark defect arrived
        ring = (mk.dilate(tmask, 4) > 0) & (tmask == 0)
        assert np.abs(out[ring].astype(int) - 200).mean() < 40       # background stays light


def test_cutpaste_picks_donors_by_seed_and_handles_odd_donors():
    img = _image((64, 64), 1)
    m = mk.random_mask("scratch", img.shape[:2], np.random.default_rng(1))
    gray = np.full((30, 200), 90, np.uint8)          # a greyscale donor, wide and thin
    gray[14:17, 25:175] = 230
    gray_donor = (gray, np.pad(np.full((4, 150), 255, np.uint8), ((13, 13), (25, 25))))
    outs = {C.CutPasteGenerator()(img, m, seed=s, donors=[*_donors(), gray_donor]).tobytes()
            for s in range(6)}
    assert len(outs) == 6


# ---------------------------------------------------------------------------------- wall colour
def _photos():
    return {"coffee": data.coffee(), "chelsea": data.chelsea(),
            "brick": np.stack([data.brick()] * 3, axis=-1)}


def _polygon_mask(shape):
    h, w = shape
    pts = np.array([[w * 0.15, h * 0.1], [w * 0.85, h * 0.2], [w * 0.8, h * 0.9], [w * 0.2, h * 0.8]],
                   np.int32)
    m = np.zeros((h, w), np.uint8)
    cv2.fillPoly(m, [pts], 255)
    return m


@pytest.mark.parametrize("photo", ["coffee", "chelsea", "brick"])
def test_wall_colour_reaches_target_and_keeps_shading(photo):
    img = _photos()[photo]
    h, w = img.shape[:2]
    rect = np.zeros((h, w), np.uint8)
    rect[h // 8: h * 7 // 8, w // 6: w * 5 // 6] = 255
    gen = C.LabRecolorGenerator()
    L_in = {}
    for shape_name, m in (("polygon", _polygon_mask((h, w))), ("rect", rect)):
        L_in = rgb_to_lab(img[m > 0])[:, 0]
        for color in WALL_COLORS:
            out = gen(img, m, seed=0, color=color)
            metrics = color_metrics(out, m, color)
            assert metrics["delta_e2000"] < 2.0, (photo, shape_name, color, metrics)
            r = np.corrcoef(L_in, rgb_to_lab(out[m > 0])[:, 0])[0, 1]
            assert r >= 0.9, (photo, shape_name, color, r)
            outside = mk.dilate(m, 4) == 0
            assert np.array_equal(out[outside], img[outside])


def test_wall_colour_extreme_targets_still_reach_the_colour():
    img = data.chelsea()
    m = _polygon_mask(img.shape[:2])
    for color in ("#111111", "#fafafa", "#00ff00", "#ffff00"):
        out = C.LabRecolorGenerator()(img, m, seed=0, color=color)
        assert color_metrics(out, m, color)["delta_e2000"] < 2.0, color


def test_wall_colour_params():
    img = _image((48, 48), 2)
    m = np.zeros((48, 48), np.uint8)
    m[10:40, 10:40] = 255
    gen = C.LabRecolorGenerator()
    with pytest.raises(ValueError, match="target colour"):
        gen(img, m, seed=0)
    with pytest.raises(ValueError, match="#RRGGBB"):
        gen(img, m, seed=0, color="#12")
    np.testing.assert_array_equal(gen(img, m, seed=0, color=(51, 102, 204)),
                                  gen(img, m, seed=0, color="#3366cc"))
    # mottle=0: seed-independent
    np.testing.assert_array_equal(gen(img, m, seed=0, color="#3366cc", mottle=0),
                                  gen(img, m, seed=9, color="#3366cc", mottle=0))
    half = gen(img, m, seed=0, color="#3366cc", strength=0.5)
    full = gen(img, m, seed=0, color="#3366cc")
    assert (color_metrics(half, m, "#3366cc")["delta_e2000"]
            > color_metrics(full, m, "#3366cc")["delta_e2000"])
