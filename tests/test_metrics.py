"""Metrics: separable → 1.0, noise → ~0.5, AUPRO against a hand-computed case."""
import numpy as np
import pytest

from pipelines.metrics import MetricError, aupro, evaluate, f1_max, image_auroc, pixel_auroc, pro_curve


def test_auroc_separable_and_noise():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(50), np.ones(50)]
    assert image_auroc(labels, np.r_[rng.uniform(0, 1, 50), rng.uniform(2, 3, 50)]) == 1.0
    noise = [image_auroc(labels, rng.normal(size=100)) for _ in range(20)]
    assert abs(np.mean(noise) - 0.5) < 0.05


def test_one_class_is_reported_not_zero():
    with pytest.raises(MetricError, match="all 3 samples are good"):
        image_auroc([0, 0, 0], [0.1, 0.2, 0.3])


def test_f1_max_threshold():
    f1, thr = f1_max([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert f1 == 1.0 and 0.2 < thr <= 0.8


def test_aupro_hand_computed():
    # one 1×10 image: pixels 0..1 are a defect region (component A), 2..9 are normal.
    masks = np.zeros((1, 1, 10), bool)
    masks[0, 0, :2] = True
    # component A: one pixel scores above every normal pixel, the other below all of them
    maps = np.array([[[0.95, 0.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]]], np.float32)
    fprs, pros = pro_curve(masks, maps, fpr_limit=0.3, steps=4)
    # FPR grid 0, .1, .2, .3 → one normal pixel of 8 above threshold only at FPR ≥ 0.125
    assert np.allclose(pros, 0.5)  # only the 0.95 pixel of A is ever above threshold
    # PRO is 0.5 from FPR 0 to 0.3: area = 0.5 * 0.3, normalised → 0.5 (first segment from 0 too)
    assert aupro(masks, maps, 0.3, steps=50) == pytest.approx(0.5, abs=0.02)
    # a perfect map gives 1.0; an inverted one 0.0
    perfect = masks.astype(np.float32)
    assert aupro(masks, perfect) == pytest.approx(1.0, abs=0.01)
    assert aupro(masks, 1 - perfect) == pytest.approx(0.0, abs=0.01)


def test_aupro_two_components_are_averaged_per_region():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, :4, :4] = True       # 16 px, fully detected
    masks[1, 0, 0] = True         # 1 px, never detected
    maps = np.zeros((2, 8, 8), np.float32)
    maps[0, :4, :4] = 1.0
    maps[1, 0, 0] = -1.0
    # per-region mean: (1 + 0) / 2 = 0.5 — a pixel-weighted measure would give 16/17
    assert aupro(masks, maps) == pytest.approx(0.5, abs=0.01)


def test_evaluate_keys_and_pixel_auroc():
    rng = np.random.default_rng(1)
    masks = np.zeros((4, 16, 16), bool)
    masks[2:, 4:8, 4:8] = True
    maps = rng.uniform(0, 0.5, masks.shape).astype(np.float32) + masks
    out = evaluate([0, 0, 1, 1], maps.reshape(4, -1).max(1), masks, maps)
    assert set(out) >= {"image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max"}
    assert out["pixel_auroc"] == 1.0 and out["image_auroc"] == 1.0
    big = np.zeros((4, 64, 64), bool)
    big[:, 10:40, 10:40] = True
    assert pixel_auroc(big, rng.uniform(size=big.shape)) == pytest.approx(0.5, abs=0.02)
