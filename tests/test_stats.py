"""Bootstrap statistics: binned metrics equal the exact ones, a zero effect's interval contains 0,
a clear effect's excludes it, verdicts follow the interval, everything is seeded."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines import metrics as MET
from pipelines.stats import (bootstrap_weights, compare, summarize, summary_metrics, verdict,
                             weighted_metrics)

N_DEF, N_GOOD, H = 12, 12, 48


def _masks(seed=0):
    rng = np.random.default_rng(seed)
    masks = np.zeros((N_DEF + N_GOOD, H, H), bool)
    for i in range(N_DEF):
        y, x = rng.integers(2, H - 14, 2)
        h, w = rng.integers(3, 12, 2)
        masks[i, y:y + h, x:x + w] = True
        if i % 3 == 0:                                  # a second region on some images
            masks[i, 2:5, 40:46] = True
    labels = np.array([1] * N_DEF + [0] * N_GOOD)
    return labels, masks


def _run(masks, signal: float, seed: int):
    """Maps = noise + signal inside the defects; image score = map max."""
    rng = np.random.default_rng(seed)
    maps = rng.normal(0, 1, masks.shape).astype(np.float32) + signal * masks
    return maps.reshape(len(maps), -1).max(1), maps


def _summary(labels, masks, signal, seed, bins=256):
    scores, maps = _run(masks, signal, seed)
    return summarize(labels, scores, masks, maps, bins=bins)


def _repeats(labels, masks, signal, base, k=3):
    return [_summary(labels, masks, signal, base + i) for i in range(k)]


def test_binned_metrics_equal_the_exact_ones():
    labels, masks = _masks()
    scores, maps = _run(masks, 1.0, 0)
    got = summary_metrics(summarize(labels, scores, masks, maps))
    assert got["pixel_auroc"] == pytest.approx(MET.pixel_auroc(masks, maps), abs=1e-3)
    assert got["pixel_ap"] == pytest.approx(MET.pixel_ap(masks, maps), abs=2e-3)
    assert got["aupro"] == pytest.approx(MET.aupro(masks, maps), abs=5e-3)
    assert got["image_auroc"] == pytest.approx(MET.image_auroc(labels, scores), abs=1e-9)


def test_weights_count_images_and_are_stratified():
    labels, masks = _masks()
    W = bootstrap_weights(labels, 50, seed=1)
    assert W.shape == (50, len(labels))
    assert np.all(W[:, labels == 1].sum(1) == N_DEF) and np.all(W[:, labels == 0].sum(1) == N_GOOD)
    assert np.array_equal(W, bootstrap_weights(labels, 50, seed=1))
    # weight 2 on an image = that image twice in the set
    scores, maps = _run(masks, 1.0, 0)
    s = summarize(labels, scores, masks, maps, bins=1024)
    w = np.ones(len(labels))
    w[[0, 15]] = 2
    dup = np.concatenate([np.arange(len(labels)), [0, 15]])
    twice = summary_metrics(summarize(labels[dup], scores[dup], masks[dup], maps[dup], bins=1024))
    got = {k: float(v[0]) for k, v in weighted_metrics(s, w[None]).items()}
    for k in twice:
        assert got[k] == pytest.approx(twice[k], abs=2e-3), k


def test_zero_effect_interval_contains_zero_and_clear_effect_excludes_it():
    labels, masks = _masks()
    a, same, better = _repeats(labels, masks, 1.0, 0), _repeats(labels, masks, 1.0, 100), \
        _repeats(labels, masks, 2.5, 200)
    res = compare({"a": a, "same": same, "better": better},
                  {"zero": ("same", "a"), "clear": ("better", "a"), "reverse": ("a", "better")},
                  n_boot=400, seed=0)
    for k in ("pixel_auroc", "pixel_ap", "aupro"):
        zero, clear, rev = res["deltas"]["zero"][k], res["deltas"]["clear"][k], res["deltas"]["reverse"][k]
        assert zero["ci95"][0] <= 0 <= zero["ci95"][1] and zero["verdict"] == "no detectable effect", (k, zero)
        assert clear["ci95"][0] > 0 and clear["verdict"] == "helped", (k, clear)
        assert rev["ci95"][1] < 0 and rev["verdict"] == "hurt", (k, rev)
        assert clear["mean"] == pytest.approx(res["arms"]["better"][k]["mean"] - res["arms"]["a"][k]["mean"])
    # an arm compared with itself: exactly zero
    self_cmp = compare({"a": a, "b": a}, {"d": ("b", "a")}, n_boot=100)
    assert all(v["ci95"] == [0.0, 0.0] and v["verdict"] == "no detectable effect"
               for v in self_cmp["deltas"]["d"].values())
    # seeded: the same inputs give the same intervals
    assert compare({"a": a, "better": better}, {"d": ("better", "a")}, n_boot=400, seed=0)["deltas"] == \
        compare({"a": a, "better": better}, {"d": ("better", "a")}, n_boot=400, seed=0)["deltas"]


def test_verdict_and_input_checks():
    assert verdict([0.01, 0.2]) == "helped"
    assert verdict([-0.2, -0.01]) == "hurt"
    assert verdict([-0.01, 0.2]) == verdict([0.0, 0.0]) == "no detectable effect"
    labels, masks = _masks()
    s = _summary(labels, masks, 1.0, 0)
    other = _summary(labels[::-1].copy(), masks[::-1], 1.0, 0)
    with pytest.raises(ValueError, match="same evaluation images"):
        compare({"a": [s], "b": [other]})
    with pytest.raises(KeyError, match="unknown arm"):
        compare({"a": [s]}, {"d": ("b", "a")})


def test_subset_gives_the_metrics_of_those_images_alone():
    """Per-damage-type results restrict the per-image statistics: the subset's metrics equal
    the exact metrics computed on those images only (the bins of the full set are fine enough)."""
    labels, masks = _masks()
    scores, maps = _run(masks, 1.0, 0)
    s = summarize(labels, scores, masks, maps)
    idx = [i for i in range(len(labels)) if labels[i] == 0] + [i for i in range(len(labels)) if labels[i]][:3]
    got = summary_metrics(s.subset(idx))
    assert got["pixel_auroc"] == pytest.approx(MET.pixel_auroc(masks[idx], maps[idx]), abs=2e-3)
    assert got["pixel_ap"] == pytest.approx(MET.pixel_ap(masks[idx], maps[idx]), abs=3e-3)
    assert got["aupro"] == pytest.approx(MET.aupro(masks[idx], maps[idx]), abs=6e-3)
    assert got["image_auroc"] == pytest.approx(MET.image_auroc(labels[idx], scores[idx]), abs=1e-9)
    assert summary_metrics(s.subset(range(len(labels)))) == summary_metrics(s)
