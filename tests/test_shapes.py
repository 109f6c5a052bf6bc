"""Mask shapes per damage type: statistics, the fitted model, classic families, the foreground."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipelines import shapes as sh
from pipelines.masks import dilate, erode
from pipelines.shapes import ShapeError

HW = (128, 128)


def _disc(hw=HW, centre=(64, 64), r=40) -> np.ndarray:
    m = np.zeros(hw, np.uint8)
    cv2.circle(m, centre, r, 255, -1)
    return m > 0


def _thin_masks(n=5, seed=0, hw=HW) -> list[np.ndarray]:
    """Crack-like references: a jagged 1–2 px line with one branch."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        m = np.zeros(hw, np.uint8)
        x = np.linspace(30, 100, 12)
        pts = np.stack([x, 64 + rng.normal(0, 4, 12)], 1).astype(np.int32)
        cv2.polylines(m, [pts], False, 255, int(rng.integers(1, 3)))
        b = pts[6]
        cv2.line(m, tuple(int(v) for v in b), (int(b[0]) + 10, int(b[1]) + 25), 255, 1)
        out.append(m > 0)
    return out


def _round_blobs(n=5, hw=HW) -> list[np.ndarray]:
    return [_disc(hw, (40 + 10 * i, 50 + 5 * i), 10 + 2 * i) for i in range(n)]


def _samples(model, n=16, fg=None, hw=HW) -> list[np.ndarray]:
    return [model.sample(hw, seed, fg) for seed in range(n)]


# ---------------------------------------------------------------------------------- statistics
def test_statistics_of_known_shapes():
    line = np.zeros(HW, bool)
    line[60:63, 20:100] = True                                 # 3 px wide, 80 long
    tee = np.zeros(HW, bool)
    tee[40, 20:100] = True
    tee[40:90, 60] = True
    two = _disc(r=8, centre=(30, 30)) | _disc(r=8, centre=(90, 90))
    st = sh.shape_statistics([line, _disc(), tee, two])
    assert set(st) == set(sh.STAT_NAMES) and all(v.shape == (4,) for v in st.values())
    assert 2.5 <= st["mean_width"][0] <= 3.5 and st["elongation"][0] > 10
    assert st["elongation"][1] == pytest.approx(1.0, abs=0.05) and st["max_width"][1] >= 78
    assert st["branch_points"][2] == 1 and st["branch_points"][0] == 0
    assert list(st["n_blobs"]) == [1, 1, 1, 2]
    assert np.isnan(st["edge_dist"]).all()                     # no foreground, no outline
    assert st["pos_x"][1] == pytest.approx(0.5, abs=0.01)


def test_statistics_against_a_foreground():
    fg = _disc()
    inner = _disc(r=5)                                         # in the middle of the disc
    rim = fg & ~_disc(r=36) & (np.arange(128)[None, :] > 90)   # a band on the outline
    st = sh.shape_statistics([inner, rim], fg)
    assert list(st["edge_contact"]) == [0, 1]
    assert st["edge_dist"][0] > 0.2 and st["edge_dist"][1] == 0
    assert list(st["inside_frac"]) == [1, 1]
    summary = sh.summarize(st)
    assert summary["inside_frac"] == (1.0, 1.0, 1.0)


# ---------------------------------------------------------------------------------- fitted model
def test_crack_model_samples_thin_masks():
    refs = _thin_masks()
    model = sh.fit_shape_model(refs)
    assert model.thin
    ref = sh.shape_statistics(refs)
    got = sh.shape_statistics(_samples(model))
    assert (got["mean_width"] <= 1.5 * ref["mean_width"].max()).all()
    assert (got["max_width"] <= 1.5 * ref["max_width"].max()).all()
    assert 0.5 * ref["skeleton_length"].min() <= np.median(got["skeleton_length"]) \
        <= 2 * ref["skeleton_length"].max()


def test_blob_model_samples_non_thin_masks():
    refs = _round_blobs()
    model = sh.fit_shape_model(refs)
    assert not model.thin
    ref = sh.shape_statistics(refs)
    got = sh.shape_statistics(_samples(model))
    assert (got["max_width"] >= 0.5 * ref["max_width"].min()).all()
    assert (got["extent"] / got["max_width"] < sh.THIN_RATIO).all()
    assert (got["elongation"] < 2.5).all()
    assert 0.5 * ref["area_frac"].min() <= np.median(got["area_frac"]) <= 2 * ref["area_frac"].max()


def test_samples_are_deterministic_per_seed_and_differ_across_seeds():
    for model in (sh.fit_shape_model(_thin_masks()), sh.fit_shape_model(_round_blobs())):
        a = model.sample(HW, 7, _disc())
        np.testing.assert_array_equal(a, model.sample(HW, 7, _disc()))
        np.testing.assert_array_equal(a, model.sample(HW, np.random.default_rng(7), _disc()))
        assert a.dtype == np.uint8 and a.shape == HW and set(np.unique(a)) <= {0, 255}
        distinct = {model.sample(HW, s).tobytes() for s in range(6)}
        assert len(distinct) >= 5


def test_samples_stay_inside_the_foreground_and_are_never_empty():
    fg = _disc(r=50)
    ring = fg & ~_disc(r=40)
    refs = [_disc(r=12, centre=(50, 50)), _disc(r=6, centre=(90, 80))] + _thin_masks(2)
    model = sh.fit_shape_model(refs, fg)
    assert model.on_product and 0 < np.mean([t.thin for t in model.templates]) < 1
    for where in (fg, ring):
        for m in _samples(model, 12, where):
            assert m.any() and not (m.astype(bool) & ~where).any()
    tiny = np.zeros(HW, bool)
    tiny[5:7, 5:8] = True                                      # 6 px of product
    for m in _samples(model, 4, tiny):
        assert m.any() and not (m.astype(bool) & ~tiny).any()


def test_edge_references_give_samples_on_the_outline():
    fg = _disc()
    bites = [fg & _disc(r=9, centre=(64 + int(40 * np.cos(a)), 64 + int(40 * np.sin(a))))
             for a in (0.3, 1.5, 2.9, 4.4)]
    model = sh.fit_shape_model(bites, fg)
    assert model.edge == 1.0 and model.on_product
    got = sh.shape_statistics(_samples(model, 16, fg), fg)
    assert got["edge_contact"].mean() >= 0.9


def test_references_off_the_foreground_are_reported():
    fg = _disc(r=20)
    off = [_disc(r=6, centre=(110, 110)), _disc(r=5, centre=(15, 110))]
    model = sh.fit_shape_model(off, fg)
    assert not model.on_product
    m = model.sample(HW, 0)                                    # sampled without the foreground
    assert sh.measure(m)["pos_y"] > 0.6                        # near where the references were


def test_fit_scales_to_another_image_size():
    model = sh.fit_shape_model(_round_blobs())
    ref = sh.shape_statistics(_round_blobs())["area_frac"]
    got = sh.shape_statistics(_samples(model, 8, hw=(256, 192)))["area_frac"]
    assert 0.5 * ref.min() <= np.median(got) <= 2 * ref.max()


def test_fit_errors_are_clear():
    with pytest.raises(ShapeError, match="sample_family"):
        sh.fit_shape_model([np.zeros(HW, bool)])
    with pytest.raises(ShapeError, match="foreground"):
        sh.fit_shape_model(_round_blobs(), [np.ones(HW, bool)] * 2)
    model = sh.fit_shape_model(_round_blobs())
    with pytest.raises(ShapeError, match="foreground is 64×64"):
        model.sample(HW, 0, np.ones((64, 64), bool))
    with pytest.raises(ShapeError, match="empty"):
        model.sample(HW, 0, np.zeros(HW, bool))


# ---------------------------------------------------------------------------------- families
@pytest.mark.parametrize("name, family", [
    ("crack", "crack"), ("scratch_head", "scratch"), ("hole", "hole"), ("poke", "hole"),
    ("faulty_imprint", "glyph"), ("print", "glyph"), ("contamination", "stain"),
    ("glue_strip", "stain"), ("color", "stain"), ("broken_large", "bite"), ("cut_lead", "bite"),
    ("missing_wire", "bite"), ("damaged_case", "bite"), ("bent_lead", "edge"),
    ("misplaced", "edge"), ("squeeze", "blob"), ("", "blob"), (None, "blob")])
def test_family_for_names(name, family):
    assert sh.family_for(name) == family


def test_families_have_their_character():
    fg = _disc(r=50)
    stats = {f: sh.shape_statistics([sh.sample_family(f, HW, s, fg) for s in range(16)], fg)
             for f in sh.FAMILIES}
    crack, scratch = stats["crack"], stats["scratch"]
    assert np.median(crack["mean_width"]) <= 3 and crack["branch_points"].mean() > 0
    assert np.median(crack["extent"] / crack["max_width"]) >= sh.THIN_RATIO
    assert (scratch["max_width"] <= 6.5).all() and np.median(scratch["elongation"]) > 5
    assert np.median(scratch["extent"] / scratch["max_width"]) >= sh.THIN_RATIO
    assert np.median(stats["hole"]["elongation"]) < 1.3
    assert (stats["bite"]["edge_contact"] == 1).all()
    assert (stats["edge"]["edge_contact"] == 1).all() and np.median(stats["edge"]["elongation"]) > 2
    for f in ("hole", "stain", "blob"):
        assert np.median(stats[f]["extent"] / stats[f]["max_width"]) < sh.THIN_RATIO


def test_families_are_deterministic_non_empty_and_inside():
    ring = _disc(r=50) & ~_disc(r=35)
    tiny = np.zeros(HW, bool)
    tiny[60:62, 60:63] = True
    for f in sh.FAMILIES:
        for where in (None, ring, tiny):
            ms = [sh.sample_family(f, HW, s, where) for s in range(4)]
            for m in ms:
                assert m.shape == HW and m.dtype == np.uint8 and m.any()
                assert where is None or not (m.astype(bool) & ~where).any()
            np.testing.assert_array_equal(ms[0], sh.sample_family(f, HW, 0, where))
        assert sh.sample_family(f, (4, 5), 0).any()
    with pytest.raises(ShapeError, match="known: crack"):
        sh.sample_family("zigzag", HW, 0)


def test_shape_model_for_falls_back_to_the_family():
    model = sh.shape_model_for("crack")
    assert isinstance(model, sh.FamilyModel) and model.family == "crack"
    assert model.sample(HW, 0).any()
    assert isinstance(sh.shape_model_for("crack", _thin_masks(2)), sh.ShapeModel)


# ---------------------------------------------------------------------------------- foreground
def _photos(obj: np.ndarray | None, n=5, seed=0) -> list[np.ndarray]:
    """Noisy dark photos with a bright object (``obj``, H×W bool) or none."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = rng.normal(30, 6, (*(HW if obj is None else obj.shape), 3))
        if obj is not None:
            img[obj] = rng.normal(200, 10, (int(obj.sum()), 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def test_estimate_foreground_finds_a_bright_disc():
    disc = _disc(centre=(70, 60), r=35)
    fg = sh.estimate_foreground(_photos(disc))
    assert fg.dtype == bool and fg.shape == HW
    assert not (fg & ~dilate(disc, 3).astype(bool)).any()   # within 3 px outside ...
    assert not (erode(disc, 3).astype(bool) & ~fg).any()    # ... and inside
    assert abs(int(fg.sum()) - int(disc.sum())) < 0.05 * disc.sum()


def test_estimate_foreground_is_the_full_frame_for_textures():
    rng = np.random.default_rng(1)
    noise = [rng.integers(0, 256, (*HW, 3), dtype=np.uint8) for _ in range(4)]
    assert sh.estimate_foreground(noise).all()
    grain = [np.clip(cv2.GaussianBlur(rng.normal(120, 40, HW), (0, 0), 2)[..., None]
                     + [10, 0, -10], 0, 255).astype(np.uint8) for _ in range(4)]
    assert sh.estimate_foreground(grain).all()
    assert sh.estimate_foreground(_photos(None)).all()         # a uniform background


def test_estimate_foreground_errors_and_sizes():
    with pytest.raises(ShapeError, match="No good images"):
        sh.estimate_foreground([])
    disc = _disc(r=30)
    imgs = _photos(disc, 2) + [cv2.resize(_photos(_disc((64, 64), (32, 32), 15), 1)[0], (96, 96))]
    assert sh.estimate_foreground(imgs).shape == HW            # resized to the first one's size
