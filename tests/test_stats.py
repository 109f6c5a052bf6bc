"""Bootstrap statistics: binned metrics equal the exact ones, a zero effect's interval contains 0,
a clear effect's excludes it, verdicts follow the interval, everything is seeded."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines import metrics as MET
from pipelines.stats import (bootstrap_weights, compare, strip_draws, summarize, summary_metrics, verdict,
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
    assert all(v["p"] == 1.0 and np.all(v["draws"] == 0) for v in self_cmp["deltas"]["d"].values())
    # seeded: the same inputs give the same intervals and draws; another seed other draws
    one, two, other = (compare({"a": a, "better": better}, {"d": ("better", "a")}, n_boot=400, seed=sd)["deltas"]
                       for sd in (0, 0, 1))
    assert all(np.array_equal(one["d"][k]["draws"], two["d"][k]["draws"]) for k in one["d"])
    assert not np.array_equal(one["d"]["pixel_ap"]["draws"], other["d"]["pixel_ap"]["draws"])
    assert strip_draws(one) == strip_draws(two)


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


# ------------------------------------------------------------------------------------------------
# Folds, ids, the repeat level, p-values, Holm


from pipelines.stats import EvalSummary, holm, interval, p_value, repeat_weights  # noqa: E402


def _fold_data(seed=0):
    """Two folds: fold 0 scores defects 0..5, fold 1 defects 6..11 (global ids 0..11), both score
    the 12 good images (global ids 100..111)."""
    labels, masks = _masks(seed)
    d_ids, g_ids = np.arange(N_DEF), 100 + np.arange(N_GOOD)
    folds = []
    for f in range(2):
        idx = np.concatenate([np.arange(6 * f, 6 * f + 6), N_DEF + np.arange(N_GOOD)])
        folds.append((idx, np.concatenate([d_ids[6 * f:6 * f + 6], g_ids])))
    return labels, masks, folds


def _fold_summaries(labels, masks, folds, signal, seed, perfect=False):
    rng = np.random.default_rng(seed)
    maps = rng.normal(0, 1, masks.shape).astype(np.float32) + signal * masks
    if perfect:
        maps = masks.astype(np.float32)                    # every defect pixel above every normal one
    scores = maps.reshape(len(maps), -1).max(1)
    return [summarize(labels[i], scores[i], masks[i], maps[i], bins=256, ids=ids) for i, ids in folds]


def test_ids_default_stored_and_kept_by_subset():
    labels, masks = _masks()
    s = _summary(labels, masks, 1.0, 0)
    assert np.array_equal(s.ids, np.arange(len(labels)))
    scores, maps = _run(masks, 1.0, 0)
    t = summarize(labels, scores, masks, maps, bins=256, ids=np.arange(len(labels)) * 10 + 7)
    sub = t.subset([3, 20, 1])
    assert sub.ids.tolist() == [37, 207, 17] and sub.labels.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="one global id per image"):
        summarize(labels, scores, masks, maps, bins=256, ids=np.arange(3))
    with pytest.raises(ValueError, match="unique"):
        summarize(labels, scores, masks, maps, bins=256, ids=np.zeros(len(labels), int))


def test_folds_pool_as_the_mean_of_fold_metrics_with_shared_good_weights():
    labels, masks, folds = _fold_data()
    a = [_fold_summaries(labels, masks, folds, 1.0, 10 + k) for k in range(3)]
    b = [_fold_summaries(labels, masks, folds, 1.5, 20 + k) for k in range(3)]
    res = compare({"a": a, "b": b}, {"d": ("b", "a")}, n_boot=200, seed=3)
    # point estimate: the mean over repeats of the mean over folds of the full-set metrics
    for k in METRICS_ALL:
        want = np.mean([np.mean([summary_metrics(s)[k] for s in rep]) for rep in b])
        assert res["arms"]["b"][k]["mean"] == pytest.approx(want, abs=1e-6), k
    # the draws by hand: one stratified draw over the union of ids (12 defects + 12 goods, not
    # 12 + 24), each fold's weights the columns of its ids, the repeats by repeat_weights
    uid = np.concatenate([np.arange(N_DEF), 100 + np.arange(N_GOOD)])
    W = bootstrap_weights(np.r_[np.ones(N_DEF), np.zeros(N_GOOD)], 200, seed=3)
    Wr = repeat_weights(3, 200, seed=3)
    col = [np.searchsorted(uid, ids) for _, ids in folds]
    def by_hand(arm):
        V = np.stack([np.mean([weighted_metrics(s, W[:, c], ["pixel_ap"])["pixel_ap"] for s, c in zip(rep, col)], 0)
                      for rep in arm])                                            # [K x B]
        return (V.T * Wr).sum(1)
    assert np.allclose(res["deltas"]["d"]["pixel_ap"]["draws"], by_hand(b) - by_hand(a), atol=1e-9)
    # an arm that is perfect in both folds: mean 1 and a point interval
    perfect = [_fold_summaries(labels, masks, folds, 0, 30 + k, perfect=True) for k in range(3)]
    res = compare({"a": a, "p": perfect}, {"d": ("p", "a")}, n_boot=200, seed=0)
    for k in METRICS_ALL:
        assert res["arms"]["p"][k]["mean"] == pytest.approx(1.0) and res["arms"]["p"][k]["ci95"] == \
            pytest.approx([1.0, 1.0]), (k, res["arms"]["p"][k])
        assert res["deltas"]["d"][k]["verdict"] == "helped"


METRICS_ALL = ("pixel_auroc", "pixel_ap", "aupro", "image_auroc")


def test_a_fold_subset_without_defects_in_a_draw_is_skipped():
    """Per-type rows: one defect in fold 0, five in fold 1; draws that leave fold 0's defect out
    average fold 1 alone (no NaN draws)."""
    labels, masks, folds = _fold_data()
    keep = [(0, [0] + list(range(6, 18))), (1, list(range(6)) + list(range(6, 18)))]
    arms = {n: [[_fold_summaries(labels, masks, folds, sig, sd + k)[f].subset(idx) for f, idx in keep]
                for k in range(2)] for n, sig, sd in (("a", 1.0, 0), ("b", 2.0, 50))}
    res = compare(arms, {"d": ("b", "a")}, n_boot=300, seed=0)
    for k in METRICS_ALL:
        assert np.all(np.isfinite(res["deltas"]["d"][k]["draws"])), k
        assert np.all(np.isfinite(res["arms"]["a"][k]["ci95"])), k


def test_arms_must_share_repeats_folds_and_ids():
    labels, masks, folds = _fold_data()
    a = [_fold_summaries(labels, masks, folds, 1.0, k) for k in range(2)]
    with pytest.raises(ValueError, match="same repeats"):
        compare({"a": a, "b": a[:1]})
    with pytest.raises(ValueError, match="same folds"):
        compare({"a": a, "b": [rep[:1] for rep in a]})
    shifted = [[EvalSummary(**{**s.__dict__, "ids": s.ids + 1000}) for s in rep] for rep in a]
    with pytest.raises(ValueError, match="same evaluation images"):
        compare({"a": a, "b": shifted})
    # folds without global ids: defects 0..5 of both folds collide
    no_ids = [[EvalSummary(**{**s.__dict__, "ids": None}) for s in rep] for rep in a]
    with pytest.raises(ValueError, match="more than one fold"):
        compare({"a": no_ids})
    # an id that is a defect in one fold and good in the other
    f0, f1 = a[0]
    clash = EvalSummary(**{**f1.__dict__, "ids": np.r_[f1.ids[:6], f0.ids[0], f1.ids[7:]]})
    with pytest.raises(ValueError, match="defective in one fold and good"):
        compare({"a": [[f0, clash]]})
    with pytest.raises(ValueError, match="no repeats"):
        compare({"a": []})
    with pytest.raises(ValueError, match="EvalSummary"):
        compare({"a": [[]]})


def test_repeat_weights_give_students_t_for_the_mean_of_the_repeats():
    from scipy import stats as st
    for k in (2, 3, 5):
        w = repeat_weights(k, 40_000, seed=1)
        assert w.shape == (40_000, k) and np.allclose(w.sum(1), 1)
        x = np.random.default_rng(k).normal(size=k)
        t = (w @ x - x.mean()) / (x.std(ddof=1) / np.sqrt(k))
        q = [0.025, 0.25, 0.75, 0.975]
        assert np.allclose(np.quantile(t, q), st.t.ppf(q, k - 1), rtol=0.05, atol=0.03), k
    m = repeat_weights(4, 50, seed=0, level="multinomial")
    assert np.allclose(m.sum(1), 1) and np.allclose(m * 4, np.round(m * 4)) and m.min() >= 0
    assert np.array_equal(repeat_weights(1, 5), np.ones((5, 1)))
    with pytest.raises(ValueError, match="repeat level"):
        repeat_weights(3, 5, level="bogus")


def test_p_value_and_its_consistency_with_the_interval():
    assert p_value(np.ones(999)) == pytest.approx(2 / 1000)
    assert p_value(-np.ones(999)) == pytest.approx(2 / 1000)
    assert p_value(np.zeros(50)) == 1.0
    assert p_value(np.r_[np.arange(1, 100), np.nan]) == pytest.approx(2 / 100)
    assert np.isnan(p_value(np.array([np.nan])))
    rng = np.random.default_rng(0)
    for i in range(300):
        B = int(rng.choice([99, 399, 400, 999, 1000, 1999]))
        d = rng.normal(rng.normal(0, 2.5), 1, B)
        ci = interval(d, 0.0)["ci95"]
        assert (p_value(d) <= 0.05) == (verdict(ci) != "no detectable effect"), (B, p_value(d), ci)


def _block(c_nonpos: int, B: int, sign: int = 1, seed: int = 0) -> dict:
    """A delta block whose draws have exactly ``c_nonpos`` draws on the wrong side of 0."""
    rng = np.random.default_rng(seed)
    d = np.r_[-rng.uniform(0.01, 1, c_nonpos), rng.uniform(0.01, 1, B - c_nonpos)] * sign
    rng.shuffle(d)
    iv = interval(d, float(d.mean()))
    return {**iv, "p": p_value(d), "verdict": verdict(iv["ci95"]), "draws": d}


def _normal_block(mean: float, sd: float, B: int = 2000, seed: int = 0) -> dict:
    """A delta block whose draws have exactly the given mean and standard deviation (ddof 1)."""
    z = np.random.default_rng(seed).normal(size=B)
    z = (z - z.mean()) / z.std(ddof=1)
    d = mean + sd * z
    iv = interval(d, mean)
    return {**iv, "p": p_value(d), "verdict": verdict(iv["ci95"]), "draws": d}


def test_holm_against_a_hand_computation():
    """Holm on the normal approximation of the draws: p = erfc(|mean| / (sd √2)), step-down
    adjusted; the adjusted interval is mean ± z_{1 − a/2}·sd at the Holm-consistent level."""
    from math import erfc, sqrt
    from scipy.stats import norm
    z_for = lambda p: norm.isf(p / 2)                # |mean| / sd that gives two-sided p
    spec = {"A": (-z_for(0.011), 1.0), "B": (z_for(0.010), 1.0), "C": (z_for(0.5), 1.0), "D": (z_for(0.040), 1.0)}
    blocks = {n: _normal_block(m_, sd, seed=i) for i, (n, (m_, sd)) in enumerate(spec.items())}
    holm(list(blocks.values()), alpha=0.05)
    assert [blocks[n]["p_normal"] for n in "ABCD"] == pytest.approx([0.011, 0.010, 0.5, 0.040])
    # ranks: B (.010·4 = .04), A (.011·3 = .033 → .04), D (.04·2 = .08), C (.5)
    want = {"B": (0.04, 1 - 0.05 / 4, "helped"), "A": (0.04, 1 - 0.05 / 3, "hurt"),
            "D": (0.08, 1 - 0.05 / 2, "no detectable effect"), "C": (0.5, 1 - 0.05 / 2, "no detectable effect")}
    for n, (p_h, level, v) in want.items():
        b = blocks[n]
        assert b["p_holm"] == pytest.approx(p_h) and b["level"] == pytest.approx(level), (n, b)
        assert b["verdict"] == v and b["family_size"] == 4 and "draws" not in b, (n, b)
        half = norm.isf((1 - level) / 2) * 1.0
        assert b["ci_adjusted"] == pytest.approx([spec[n][0] - half, spec[n][0] + half]), n
        assert erfc(abs(spec[n][0]) / sqrt(2)) == pytest.approx(b["p_normal"])
    assert blocks["D"]["ci_adjusted"][0] <= 0 <= blocks["D"]["ci_adjusted"][1]
    assert blocks["D"]["ci95"][0] > 0             # unadjusted it would have been "helped"
    with pytest.raises(ValueError, match="no 'p' or no 'draws'"):
        holm(list(blocks.values()))
    one = _normal_block(1.0, 1.0)
    with pytest.raises(ValueError, match="twice"):
        holm([one, one])
    holm([])


def test_holm_reaches_levels_a_large_family_needs():
    """A family of 72 needs p ≤ 0.05/72 ≈ 0.0007 for its first rejection: 1000 draws cannot count
    that far, the normal approximation can — a clear effect is still found, and nulls are not."""
    fam = [_normal_block(5.0, 1.0, B=1000, seed=0)] + [_normal_block(0.1, 1.0, B=1000, seed=i) for i in range(1, 72)]
    holm(fam)
    assert fam[0]["verdict"] == "helped" and fam[0]["ci_adjusted"][0] > 0
    assert all(b["verdict"] == "no detectable effect" for b in fam[1:])
    assert all(np.isfinite(b["ci_adjusted"]).all() for b in fam)


def test_holm_intervals_and_verdicts_agree_on_random_families():
    rng = np.random.default_rng(1)
    for trial in range(60):
        m, B = int(rng.integers(1, 30)), int(rng.choice([200, 999, 1000, 1999]))
        fam = []
        for j in range(m):
            d = rng.normal(rng.choice([0, 0, rng.normal(0, 4)]), 1, B)
            iv = {"mean": float(d.mean()), "ci95": list(np.percentile(d, [2.5, 97.5]))}
            fam.append({**iv, "p": p_value(d), "verdict": "x", "draws": d})
        holm(fam, alpha=0.05)
        p = np.array([b["p_normal"] for b in fam])
        ph = np.array([b["p_holm"] for b in fam])
        order = np.argsort(p, kind="stable")
        assert np.all(np.diff(ph[order]) >= -1e-15) and np.all(p <= ph + 1e-15) and np.all(ph <= 1)
        rejected = ph <= 0.05
        for b, rej in zip(fam, rejected):
            lo, hi = b["ci_adjusted"]
            assert "draws" not in b and b["family_size"] == m
            assert (b["verdict"] != "no detectable effect") == rej, b
            if rej:
                assert (lo > 0 and b["verdict"] == "helped") or (hi < 0 and b["verdict"] == "hurt"), b
            else:
                assert lo <= 0 <= hi, b
            if m == 1:
                assert b["level"] == pytest.approx(0.95)
        # every non-rejected one shares the level of the first non-rejected rank
        levels = {round(b["level"], 12) for b, r in zip(fam, rejected) if not r}
        assert len(levels) <= 1


def test_strip_draws_removes_every_draws_key():
    obj = {"a": {"draws": np.ones(3), "mean": 1}, "b": [{"x": {"draws": 1, "y": 2}}, ({"draws": 0},)], "draws": 5}
    out = strip_draws(obj)
    assert out is obj and obj == {"a": {"mean": 1}, "b": [{"x": {"y": 2}}, ({},)]}
