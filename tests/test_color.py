"""Colour utilities: hex parsing, LAB conversion, dominant colour, references, ΔE metrics."""
from __future__ import annotations

import numpy as np
import pytest
from skimage import color as skcolor

from pipelines import color as col
from pipelines.masks import MaskError


def test_parse_hex_and_to_hex_round_trip():
    assert col.parse_hex("#3366cc") == (0x33, 0x66, 0xCC)
    assert col.parse_hex("3366CC") == (0x33, 0x66, 0xCC)
    assert col.parse_hex(" #abc ") == (0xAA, 0xBB, 0xCC)
    for rgb in [(0, 0, 0), (255, 255, 255), (18, 52, 86)]:
        assert col.parse_hex(col.to_hex(rgb)) == rgb
    assert col.to_hex((51.4, 102, 204)) == "#3366cc"


@pytest.mark.parametrize("bad", ["", "#12345", "#ggg000", "red", "#3366cc00", None, 123])
def test_parse_hex_rejects_with_a_message(bad):
    with pytest.raises(ValueError, match="#RRGGBB"):
        col.parse_hex(bad)


def test_as_rgb():
    assert col.as_rgb("#010203") == (1, 2, 3)
    assert col.as_rgb((1.2, 2, 254.6)) == (1, 2, 255)
    for bad in [(1, 2), (0, 0, 300), "nope", 5]:
        with pytest.raises(ValueError):
            col.as_rgb(bad)


def test_rgb_to_lab_matches_skimage():
    img = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    np.testing.assert_allclose(col.rgb_to_lab(img), skcolor.rgb2lab(img), atol=1e-9)
    np.testing.assert_allclose(col.rgb_to_lab(img.astype(np.float64) / 255), skcolor.rgb2lab(img),
                               atol=1e-9)
    triple = col.rgb_to_lab((51, 102, 204))
    assert triple.shape == (3,)
    np.testing.assert_allclose(triple, skcolor.rgb2lab(np.uint8([[[51, 102, 204]]]))[0, 0])
    back = col.lab_to_rgb(col.rgb_to_lab(img))
    np.testing.assert_array_equal(back, img)


def test_fit_to_srgb_keeps_in_gamut_and_fixes_out_of_gamut():
    lab_in = col.rgb_to_lab(np.random.default_rng(1).integers(0, 256, (50, 3), dtype=np.uint8))
    np.testing.assert_allclose(col.fit_to_srgb(lab_in), lab_in)
    wild = np.array([[60.0, 90.0, -100.0], [30.0, -80.0, 80.0], [95.0, 0.0, 90.0],
                     [97.15, -21.55, 94.48]])      # the last one is just past the yellow cusp
    fitted = col.fit_to_srgb(wild)
    lin = col.lab_to_linear_rgb(fitted)
    assert (lin > -1e-3).all() and (lin < 1 + 1e-3).all()
    # never worse (ΔL weighted ×2) than clipping RGB channels, which is what lab2rgb does
    clipped = col.linear_rgb_to_lab(np.clip(col.lab_to_linear_rgb(wild), 0, 1))
    w = np.array([2.0, 1.0, 1.0])
    assert (np.linalg.norm((fitted - wild) * w, axis=1)
            <= np.linalg.norm((clipped - wild) * w, axis=1) + 1e-9).all()
    assert skcolor.deltaE_ciede2000(fitted[3], wild[3]) < 1.0


def test_dominant_color_methods():
    img = np.zeros((40, 40, 3), np.uint8)
    img[:, :28] = (200, 30, 30)          # 70 % red
    img[:, 28:] = (20, 40, 220)          # 30 % blue
    img[::7, ::5] = (255, 255, 255)      # some specular noise
    mask = np.full((40, 40), 255, np.uint8)
    km = col.dominant_color(img, mask, "kmeans")
    assert max(abs(a - b) for a, b in zip(km, (200, 30, 30))) <= 3
    assert col.dominant_color(img, mask, "median") == (200, 30, 30)
    mean = col.dominant_color(img, mask, "mean")
    assert 30 < mean[2] < 200                                 # a blend of both
    only_blue = np.zeros((40, 40), np.uint8)
    only_blue[:, 30:] = 255
    assert col.dominant_color(img, only_blue, "kmeans")[2] > 200
    with pytest.raises(ValueError, match="kmeans"):
        col.dominant_color(img, mask, "mode")
    with pytest.raises(MaskError):
        col.dominant_color(img, np.zeros((40, 40), np.uint8))


def test_solid_reference():
    ref = col.solid_reference("#3366cc", size=64, seed=3)
    assert ref.shape == (64, 64, 3) and ref.dtype == np.uint8
    np.testing.assert_array_equal(ref, col.solid_reference((51, 102, 204), size=64, seed=3))
    assert not np.array_equal(ref, col.solid_reference("#3366cc", size=64, seed=4))
    assert ref[:, :8].mean() < ref[:, -8:].mean()              # lighting gradient left → right
    m = col.color_metrics(ref, np.full((64, 64), 255, np.uint8), "#3366cc")
    assert m["delta_e2000"] < 1.5
    flat = col.solid_reference("#808080", size=(10, 20), noise_sigma=0, gradient=(1, 1))
    assert flat.shape == (10, 20, 3) and (flat == 128).all()


def test_color_metrics_values():
    ref = col.solid_reference("#c0392b", size=48, noise_sigma=4, seed=0)
    mask = np.zeros((48, 48), np.uint8)
    mask[10:30, 5:40] = 255
    same = col.color_metrics(ref, mask, "#c0392b")
    assert same["delta_e2000"] < 1.0 and same["delta_e76"] < 2.0
    assert same["hue_error_deg"] < 2.0 and abs(same["chroma_diff"]) < 2.0
    assert same["lab_distance"] >= same["delta_e76"]           # per-pixel spread ≥ mean's error
    assert same["n_pixels"] == 20 * 35
    other = col.color_metrics(ref, mask, "#2e7d32")
    assert other["delta_e2000"] > 30 and other["hue_error_deg"] > 90
    # only masked pixels count
    polluted = ref.copy()
    polluted[mask == 0] = (0, 255, 0)
    assert col.color_metrics(polluted, mask, "#c0392b") == same


def test_color_metrics_hue_error_is_circular():
    # hues just either side of 0° in LAB: error is small, not ~360
    a = col.lab_to_rgb(np.array([50.0, 40.0, 4.0]))
    b = col.lab_to_rgb(np.array([50.0, 40.0, -4.0]))
    img = np.tile(np.asarray(a, np.uint8), (8, 8, 1))
    m = col.color_metrics(img, np.full((8, 8), 255, np.uint8), tuple(int(v) for v in b))
    assert m["hue_error_deg"] < 20


def test_color_metrics_rejects_empty_masks():
    img = col.solid_reference("#e8d8b0", size=32)
    with pytest.raises(MaskError, match="paint the region"):
        col.color_metrics(img, np.zeros((32, 32), np.uint8), "#e8d8b0")
    tiny = np.zeros((32, 32), np.uint8)
    tiny[0, :10] = 255
    with pytest.raises(ValueError, match="at least 16 px"):
        col.color_metrics(img, tiny, "#e8d8b0")
    with pytest.raises(MaskError, match="repaint"):
        col.color_metrics(img, np.full((16, 32), 255, np.uint8), "#e8d8b0")
    with pytest.raises(ValueError, match="#RRGGBB"):
        col.color_metrics(img, np.full((32, 32), 255, np.uint8), "#zzz")


def test_chroma_diff_is_the_ab_distance_not_a_difference_of_chromas():
    # same chroma, opposite hue: |C1| − |C2| would say 0; √(Δa² + Δb²) says 2·C
    a = np.array([60.0, 30.0, 0.0])
    b = np.array([60.0, -30.0, 0.0])
    img = np.tile(col.lab_to_rgb(a), (8, 8, 1))
    m = col.color_metrics(img, np.full((8, 8), 255, np.uint8), tuple(int(v) for v in col.lab_to_rgb(b)))
    mean = np.array(m["mean_lab"])
    target = col.rgb_to_lab(col.lab_to_rgb(b))
    assert m["chroma_diff"] == pytest.approx(np.hypot(*(mean[1:] - target[1:])), abs=1e-9)
    assert m["chroma_diff"] > 50


def test_grades_follow_the_thresholds():
    def g(lab, hue, de):
        return col.grade({"lab_distance": lab, "hue_error_deg": hue, "delta_e2000": de})
    assert g(4.9, 2.9, 2.9) == "excellent"
    assert g(5.0, 2.0, 2.0) == "good"               # every criterion must pass
    assert g(14.9, 9.9, 9.9) == "good"
    assert g(14.9, 10.0, 1.0) == "poor" and g(15.0, 1.0, 1.0) == "poor" and g(1, 1, 10.0) == "poor"
    assert col.passes({"lab_distance": 4, "hue_error_deg": 1, "delta_e2000": 1}, "excellent")
    assert not col.passes({"lab_distance": 40, "hue_error_deg": 1, "delta_e2000": 1})


def test_hue_error_is_zero_for_a_neutral_target():
    img = col.solid_reference("#8a7f80", 16, noise_sigma=0, gradient=(1, 1))   # a slightly warm grey
    m = col.color_metrics(img, np.full((16, 16), 255, np.uint8), "#808080")
    assert m["hue_error_deg"] == 0.0 and m["delta_e2000"] > 1
