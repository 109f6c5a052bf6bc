"""Masks: conversion, the ImageEditor value, morphology, feathering, validation, random masks."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines import masks as mk
from pipelines.masks import MaskError


def _square(h=32, w=40, y0=8, y1=20, x0=10, x1=25):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 255
    return m


# ---------------------------------------------------------------------------------- to_binary
def test_to_binary_accepts_common_forms():
    ref = _square()
    on = ref > 0
    forms = [
        ref,
        on,                                                    # bool
        on.astype(np.float32),                                 # float 0..1
        on.astype(np.float64) * 0.8,                           # float 0..1 (not exactly 1)
        np.stack([np.zeros_like(ref), ref, np.zeros_like(ref)], -1),   # any channel
        np.dstack([np.zeros((*ref.shape, 3), np.uint8), ref]),  # RGBA: alpha
        np.dstack([np.full((*ref.shape, 3), 255, np.uint8)[..., :3] * on[..., None],
                   np.full(ref.shape, 255, np.uint8)]),        # opaque RGBA: RGB used
        ref[..., None],
        Image.fromarray(ref),
        Image.fromarray(np.dstack([np.zeros((*ref.shape, 3), np.uint8), ref]), "RGBA"),
    ]
    for f in forms:
        out = mk.to_binary(f)
        assert out.dtype == np.uint8 and out.shape == ref.shape
        assert set(np.unique(out)) <= {0, 255}
        np.testing.assert_array_equal(out, ref)


def test_to_binary_threshold_and_path(tmp_path):
    grey = np.array([[0, 100, 128, 255]], np.uint8)
    np.testing.assert_array_equal(mk.to_binary(grey), [[0, 0, 255, 255]])
    np.testing.assert_array_equal(mk.to_binary(grey, threshold=50), [[0, 255, 255, 255]])
    path = tmp_path / "m.png"
    Image.fromarray(_square()).save(path)
    np.testing.assert_array_equal(mk.to_binary(path), _square())
    with pytest.raises(MaskError):
        mk.to_binary(np.zeros((2, 2, 2, 2)))


# ---------------------------------------------------------------------------- mask_from_editor
def _rgba_layer(h, w, y0, y1, x0, x1, alpha=255):
    layer = np.zeros((h, w, 4), np.uint8)
    layer[y0:y1, x0:x1] = (255, 0, 0, alpha)
    return layer


def test_mask_from_editor_unions_rgba_layers():
    h, w = 48, 64
    bg = np.full((h, w, 3), 90, np.uint8)
    l1 = _rgba_layer(h, w, 5, 10, 5, 20)
    l2 = _rgba_layer(h, w, 30, 40, 40, 60, alpha=40)        # faint stroke still counts
    value = {"background": bg, "layers": [l1, l2], "composite": bg}
    m = mk.mask_from_editor(value)
    assert m.shape == (h, w) and m.dtype == np.uint8
    expected = np.zeros((h, w), np.uint8)
    expected[5:10, 5:20] = 255
    expected[30:40, 40:60] = 255
    np.testing.assert_array_equal(m, expected)
    # same with PIL layers and an RGB layer without alpha
    rgb_layer = np.zeros((h, w, 3), np.uint8)
    rgb_layer[30:40, 40:60] = 7
    value = {"background": Image.fromarray(bg), "layers": [Image.fromarray(l1, "RGBA"), rgb_layer],
             "composite": None}
    np.testing.assert_array_equal(mk.mask_from_editor(value), expected)


def test_mask_from_editor_empty_and_none():
    bg = np.zeros((20, 30, 3), np.uint8)
    for value in ({"background": bg, "layers": [], "composite": bg},
                  {"background": bg, "layers": None, "composite": None},
                  {"background": bg, "layers": [None], "composite": None}):
        m = mk.mask_from_editor(value)
        assert m.shape == (20, 30) and not m.any()
    assert mk.mask_from_editor(None, shape=(7, 9, 3)).shape == (7, 9)
    assert mk.mask_from_editor({"background": None, "layers": []}, shape=(4, 5)).shape == (4, 5)
    with pytest.raises(MaskError, match="load a product image"):
        mk.mask_from_editor(None)


def test_mask_from_editor_resizes_layers_and_reads_files(tmp_path):
    small = _rgba_layer(24, 32, 0, 12, 0, 16)            # top-left quarter at half size
    path = tmp_path / "layer.png"
    Image.fromarray(small, "RGBA").save(path)
    for layer in (small, str(path)):
        m = mk.mask_from_editor({"background": None, "layers": [layer]}, shape=(48, 64))
        assert m.shape == (48, 64)
        assert m[:24, :32].all() and not m[24:, :].any() and not m[:, 32:].any()


# ----------------------------------------------------------------------------------- morphology
def test_dilate_erode_disc_and_copies():
    m = np.zeros((21, 21), np.uint8)
    m[10, 10] = 255
    d = mk.dilate(m, 3)
    yy, xx = np.mgrid[:21, :21]
    np.testing.assert_array_equal(d > 0, (yy - 10) ** 2 + (xx - 10) ** 2 <= 9)   # a disc
    assert mk.area(d) == 29
    sq = _square()
    for fn in (mk.dilate, mk.erode):
        c = fn(sq, 0)
        np.testing.assert_array_equal(c, sq)
        assert c is not sq
    assert ((mk.dilate(sq, 2) > 0) >= (sq > 0)).all()
    e = mk.erode(sq, 2)
    assert ((e > 0) <= (sq > 0)).all() and 0 < mk.area(e) < mk.area(sq)
    np.testing.assert_array_equal(mk.erode(mk.dilate(sq, 0), 100), np.zeros_like(sq))
    assert not mk.dilate(np.zeros((5, 5), np.uint8), 3).any()


@pytest.mark.parametrize("radius", [1, 3, 4, 7.5])
def test_feather_properties(radius):
    rng = np.random.default_rng(int(radius * 10))
    m = mk.random_mask("blob", (64, 80), rng)
    a = mk.feather(m, radius)
    assert a.dtype == np.float32 and a.shape == m.shape
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert (a[m > 0] == 1.0).all()
    assert (a[mk.dilate(m, radius) == 0] == 0.0).all()
    ring = (m == 0) & (mk.dilate(m, radius) > 0)
    assert (a[ring] < 1.0).all()
    if radius >= 3:
        assert (a[ring] > 0).any()
    if radius < 3:
        return
    # decreases with distance from the mask
    a1 = a[(mk.dilate(m, 1) > 0) & (m == 0)].mean()
    a2 = a[(mk.dilate(m, 2) > 0) & (mk.dilate(m, 1) == 0)].mean()
    assert a1 > a2


def test_feather_zero_radius_is_hard_mask():
    m = _square()
    np.testing.assert_array_equal(mk.feather(m, 0), (m > 0).astype(np.float32))


def test_invert_clear_bbox_area():
    m = _square()
    assert mk.bbox(m) == (10, 8, 25, 20)
    assert mk.area(m) == 12 * 15
    inv = mk.invert(m)
    assert mk.area(inv) == m.size - mk.area(m) and not (inv & m).any()
    c = mk.clear((5, 6, 3))
    assert c.shape == (5, 6) and c.dtype == np.uint8 and not c.any()
    assert mk.bbox(c) is None and mk.area(c) == 0
    one = np.zeros((4, 4), np.uint8)
    one[3, 3] = 255
    assert mk.bbox(one) == (3, 3, 4, 4)


# ---------------------------------------------------------------------------------- validation
def test_validate_mask_errors_are_readable():
    with pytest.raises(MaskError) as exc:
        mk.validate_mask(np.full((200, 300), 255, np.uint8), (256, 256, 3))
    assert str(exc.value) == ("The mask is 300×200 px but the image is 256×256 px — "
                              "repaint it on this image or resize it")
    with pytest.raises(MaskError) as exc:
        mk.validate_mask(np.zeros((256, 256), np.uint8), (256, 256, 3))
    assert str(exc.value) == "The mask is empty — paint the defect region first"
    with pytest.raises(MaskError, match="empty"):
        mk.validate_mask(None, (4, 4))
    with pytest.raises(MaskError, match="covers only 180 px; paint at least 2500 px"):
        mk.validate_mask(_square(), (32, 40), min_pixels=50 * 50)
    assert isinstance(MaskError("x"), ValueError)


def test_validate_mask_returns_binary():
    soft = np.zeros((32, 40), np.float32)
    soft[8:20, 10:25] = 0.9
    out = mk.validate_mask(soft, (32, 40, 3))
    np.testing.assert_array_equal(out, _square())


# -------------------------------------------------------------------------------- random masks
@pytest.mark.parametrize("style", mk.STYLES)
def test_random_mask_non_empty_and_deterministic(style):
    for seed in range(6):
        for shape in ((128, 128), (64, 200), (20, 20)):
            m = mk.random_mask(style, shape, np.random.default_rng(seed))
            assert m.shape == shape and m.dtype == np.uint8
            assert set(np.unique(m)) <= {0, 255} and mk.area(m) > 0
    a = mk.random_mask(style, (96, 96), 7)
    b = mk.random_mask(style, (96, 96), np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(mk.random_mask(style, (96, 96), 8), a)


@pytest.mark.parametrize("style", mk.STYLES)
def test_random_mask_inside_region(style):
    region = np.zeros((128, 160), np.uint8)
    yy, xx = np.mgrid[:128, :160]
    region[(yy - 64) ** 2 / 50 ** 2 + (xx - 80) ** 2 / 60 ** 2 <= 1] = 255
    edge = (region > 0) & (mk.erode(region, 1) == 0)
    for seed in range(6):
        m = mk.random_mask(style, region.shape, np.random.default_rng(seed), region=region)
        assert mk.area(m) > 0
        assert not ((m > 0) & (region == 0)).any()
        if style == "broken":
            assert ((m > 0) & edge).any(), "a broken chunk touches the region boundary"


def test_random_mask_tiny_and_bad_regions():
    region = np.zeros((50, 50), np.uint8)
    region[20, 30] = 255
    for style in mk.STYLES:
        m = mk.random_mask(style, region.shape, 0, region=region)
        np.testing.assert_array_equal(m, region)
    with pytest.raises(MaskError, match="empty"):
        mk.random_mask("blob", (10, 10), 0, region=np.zeros((10, 10), np.uint8))
    with pytest.raises(MaskError, match="known: scratch"):
        mk.random_mask("splash", (10, 10), 0)
    with pytest.raises(MaskError):
        mk.random_mask("blob", (10, 10), 0, region=np.ones((12, 10), np.uint8))
