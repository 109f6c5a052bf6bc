"""Bootstrap confidence intervals, p-values and Holm-adjusted verdicts for anomaly-detection
metrics, paired between arms.

The experiment asks "did synthetic data help?" of two (or more) *arms* (e.g. a positive bank of
reference defects only vs reference + synthetic), each run ``K`` times (repeats; repeat ``k`` of
every arm uses seed ``k``) and scored on the **same** evaluation images. A difference is only
called an effect when its bootstrap interval excludes zero (:func:`verdict`) — never from a point
estimate — and, over a run's family of differences, only after the Holm–Bonferroni step-down
(:func:`holm`). The user's page is ``docs/STATISTICS.md``.

Folds (cross-fitting). A repeat may be scored as ``F`` folds, one :class:`EvalSummary` each: fold
``f`` scores its own evaluation defects plus all the good images. Every image has a global integer
id (:attr:`EvalSummary.ids`); a good image has the same id in every fold, a defect id appears in
exactly one fold. An arm's metric in a repeat is the **mean of its fold metrics**.

Resampling: a two-level, paired, stratified bootstrap. Draw ``b``

1. resamples the global images with replacement, stratified (the defect images and the good images
   separately, so every draw has both), as multinomial counts ``W: [B x U]`` over the union of the
   folds' ids; fold ``f`` sees the columns of its ids (a good image drawn twice counts twice in
   every fold);
2. resamples the repeats: weights ``[B x K]`` of the repeats, the **same** for every arm (paired:
   repeat ``k`` of every arm shares seed ``k``) — by default t-weighted (:func:`repeat_weights`:
   the percentile interval of the repeat level is the t-interval of the mean of ``K`` repeats;
   ``K`` indices drawn with replacement, ``repeat_level="multinomial"``, is too narrow for a few
   repeats).

An arm's value in draw ``b`` is the repeat-weighted mean (for the multinomial level: the mean over
the drawn repeat indices) of its mean over folds of the fold's metric under the fold's weights
(folds whose metric is undefined in that draw, e.g. a fold subset whose defects were all left out,
skipped). So the interval covers which images
happened to be evaluated *and* which seeds happened to be run (segmenter initialisation, coreset
sampling); the image-only bootstrap (``resample_repeats=False``) covers the first only and is
over-confident when the repeat-to-repeat variation matters (``tests/test_stats_calibration.py``).
Both levels are drawn once per call and shared by every arm and metric. Seeded: the same inputs
give the same intervals.

Intervals and p-values: the interval at level ``1 − a`` is the order-statistic percentile
interval ``[d_(k), d_(n+1−k)]`` of the ``n`` (finite) draws, ``k = ⌊(n + 1)·a/2⌋`` (±∞ where
``k < 1``: ``n`` draws cannot resolve that level). The two-sided p-value of a difference is
``min(1, 2·min(#(d ≤ 0) + 1, #(d ≥ 0) + 1) / (n + 1))``. With these two definitions an interval
at level ``1 − a`` excludes 0 exactly when ``p ≤ a`` (no percentile-interpolation quirks), so
verdicts, p-values and adjusted intervals agree.

Cost: metrics on a resampled set are computed from per-image sufficient statistics
(:class:`EvalSummary`), never by re-scoring millions of pixels per draw:

* pixel scores are binned into ``bins`` quantile bins of the run's own score distribution
  (~256 pixels per bin on average, at most 4096: :func:`default_bins`; finer towards the top
  scores); per image, the defect and normal pixel counts per bin ``[N x bins]``, and per
  ground-truth region (8-connected component) its pixel counts per bin ``[C x bins]``;
* a draw's histograms are one matrix product (``W @ hist``); pixel AUROC (Mann–Whitney with
  ties in a bin counted half), pixel AP (scikit-learn's step-wise sum, thresholds at bin edges)
  and AUPRO (PRO vs FPR, trapezoids up to FPR 0.3, normalised; per-region overlap averaged over
  regions weighted by their image's count) follow in O(bins);
* image AUROC from the pairwise order matrix of defect vs good image scores;
* the ``[B]`` metric vector of each (arm, repeat, fold) is computed once; the repeat level is a
  gather and a mean over those vectors.

With 4096 bins (256 px images and up) the binned metrics on the full set equal
:mod:`pipelines.metrics` 's to about 1e-3 (tested; a bin's pixels count as ties, so AUROC is off
by at most half a bin's share of the normal pixels); the reported ``mean`` is the binned metric on
the full set, averaged over folds and repeats, so the mean and its interval come from one
estimator.
"""
from __future__ import annotations

import warnings
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

METRICS = ("pixel_auroc", "pixel_ap", "aupro", "image_auroc")
VERDICTS = ("helped", "no detectable effect", "hurt")
DEFAULT_BINS = 4096
FPR_LIMIT = 0.3


@dataclass
class EvalSummary:
    """Sufficient statistics of one run (one arm, one repeat, one fold) on an evaluation set of
    ``N`` images.

    labels ``[N]`` (1 = defective image), scores ``[N]`` image scores, pos_hist / neg_hist
    ``[N x bins]`` defect / normal pixel counts per score bin, comp_image ``[C]`` the image of each
    ground-truth region, comp_hist ``[C x bins]`` its pixel counts per bin, comp_size ``[C]``,
    ids ``[N]`` the images' global integer ids (unique; given as ``None``: ``0..N-1``), which
    :func:`compare` uses to pair images across folds."""
    labels: np.ndarray
    scores: np.ndarray
    pos_hist: np.ndarray
    neg_hist: np.ndarray
    comp_image: np.ndarray
    comp_hist: np.ndarray
    comp_size: np.ndarray
    ids: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.labels)
        if self.ids is None:
            self.ids = np.arange(n)
        else:
            ids = np.asarray(self.ids)
            if ids.ndim != 1 or len(ids) != n:
                raise ValueError(f"ids has shape {ids.shape}, expected ({n},): one global id per image")
            if ids.size and not np.issubdtype(ids.dtype, np.integer):
                if not np.all(np.isfinite(ids)) or not np.array_equal(ids, np.round(ids)):
                    raise ValueError("ids must be integers (global image ids)")
            ids = ids.astype(np.int64)
            if len(np.unique(ids)) != n:
                raise ValueError("ids must be unique within an evaluation set (one global id per image)")
            self.ids = ids

    @property
    def n(self) -> int:
        return len(self.labels)

    def subset(self, idx) -> "EvalSummary":
        """The statistics of images ``idx`` only (in that order), e.g. one damage type's defects
        plus the good images. The score bins stay those of the full set."""
        idx = np.asarray(idx, int)
        new_of = np.full(self.n, -1)
        new_of[idx] = np.arange(len(idx))
        keep = np.isin(self.comp_image, idx)
        return EvalSummary(self.labels[idx], self.scores[idx], self.pos_hist[idx], self.neg_hist[idx],
                           new_of[self.comp_image[keep]], self.comp_hist[keep], self.comp_size[keep],
                           self.ids[idx])


def default_bins(n_pixels: int) -> int:
    """Bins for ``n_pixels`` scored pixels: ~256 pixels per bin, 256..:data:`DEFAULT_BINS`."""
    return int(min(DEFAULT_BINS, max(256, n_pixels // 256)))


def summarize(labels, scores, masks, maps, bins: int | None = None, ids=None) -> EvalSummary:
    """``labels [N]``, ``scores [N]``, ``masks [N x H x W]`` bool, ``maps [N x H x W]`` float →
    :class:`EvalSummary`. Bin edges: quantiles of all of ``maps``' pixels (so bins are fine where
    the scores are dense, finer towards the top); pixels of one bin are ties. ``bins``: default
    :func:`default_bins`. ``ids [N]``: the images' global integer ids (default ``0..N-1``)."""
    labels = np.asarray(labels).astype(int).ravel()
    scores = np.asarray(scores, np.float64).ravel()
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, np.float32)
    if masks.shape != maps.shape or len(masks) != len(labels) or len(scores) != len(labels):
        raise ValueError(f"shapes differ: labels {labels.shape}, scores {scores.shape}, masks "
                         f"{masks.shape}, maps {maps.shape}")
    flat = maps.reshape(len(maps), -1)
    bins = default_bins(flat.size) if bins is None else int(bins)
    sample = flat.ravel()[:: max(1, flat.size // 2_000_000)]
    # quantile levels 1 − (1 − u)²: twice as coarse as uniform at the low end, ever finer towards
    # the top scores, where average precision (and the PRO curve's start) is decided
    levels = 1 - (1 - np.linspace(0, 1, bins + 1)[1:-1]) ** 2
    edges = np.unique(np.quantile(sample, levels))
    idx = np.searchsorted(edges, flat, side="right")                  # [N x HW] in 0..len(edges)
    nb = len(edges) + 1
    m = masks.reshape(len(masks), -1)
    pos = np.zeros((len(flat), nb))
    neg = np.zeros((len(flat), nb))
    comp_image, comp_hist, comp_size = [], [], []
    from scipy import ndimage   # here, not at import: the studio's first page loads this module
    structure = np.ones((3, 3), int)
    for i in range(len(flat)):
        pos[i] = np.bincount(idx[i][m[i]], minlength=nb)
        neg[i] = np.bincount(idx[i][~m[i]], minlength=nb)
        if m[i].any():
            lab, n = ndimage.label(masks[i], structure=structure)
            lab = lab.ravel()
            sel = lab > 0
            h = np.bincount((lab[sel] - 1) * nb + idx[i][sel], minlength=n * nb).reshape(n, nb)
            comp_hist.append(h)
            comp_size.append(h.sum(1))
            comp_image += [i] * n
    comp_hist_a = np.concatenate(comp_hist) if comp_hist else np.zeros((0, nb))
    # float32: counts stay exact up to 2^24 per bin, and the bootstrap's [B x bins] passes are
    # memory-bound, so half the bytes is about half the time
    return EvalSummary(labels, scores, pos.astype(np.float32), neg.astype(np.float32),
                       np.asarray(comp_image, int), comp_hist_a.astype(np.float32),
                       np.concatenate(comp_size).astype(np.float32) if comp_size else np.zeros(0, np.float32),
                       None if ids is None else np.asarray(ids).ravel())


# ------------------------------------------------------------------------------------------------
# Metrics of a weighted (resampled) evaluation set


def _auroc_from_hists(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """``pos, neg: [B x nb]`` counts per bin (ascending scores) → AUROC ``[B]`` (ties = ½)."""
    below = np.cumsum(neg, axis=1) - neg
    P, N = pos.sum(1), neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(1) / (P * N)


def _ap_from_hists(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Average precision, scikit-learn's definition: Σ_k (R_k − R_{k+1}) · P_k over thresholds at
    the bin edges (descending)."""
    tp = np.cumsum(pos[:, ::-1], axis=1)[:, ::-1]                      # defect pixels with bin ≥ b
    fp = np.cumsum(neg[:, ::-1], axis=1)[:, ::-1]
    P = pos.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-30), 0.0)
        return (pos * precision).sum(1) / P


def _aupro_from_hists(neg: np.ndarray, comp_w: np.ndarray, comp_hist: np.ndarray, comp_size: np.ndarray,
                      fpr_limit: float = FPR_LIMIT) -> np.ndarray:
    """``neg [B x nb]``, region weights ``comp_w [B x C]``, ``comp_hist [C x nb]``, sizes ``[C]`` →
    normalised area under PRO(FPR) for FPR in [0, fpr_limit] ``[B]``."""
    fpr = np.cumsum(neg[:, ::-1], axis=1) / np.maximum(neg.sum(1, keepdims=True), 1e-30)    # [B x nb]
    # only the bins up to the first one past the limit in every draw matter (a third or so)
    past = np.argmax(fpr >= fpr_limit, axis=1)
    cut = int(past.max()) + 1 if bool((fpr[:, -1] >= fpr_limit).all()) else fpr.shape[1]
    fpr = fpr[:, :cut]
    overlap = np.cumsum(comp_hist[:, ::-1], axis=1)[:, :cut] / comp_size[:, None]             # [C x nb]
    with np.errstate(invalid="ignore", divide="ignore"):
        pro = (comp_w @ overlap) / comp_w.sum(1, keepdims=True)                               # [B x nb]
    x = np.concatenate([np.zeros((len(fpr), 1)), fpr], 1)
    y = np.concatenate([np.zeros((len(pro), 1)), pro], 1)
    x0, x1, y0, y1 = x[:, :-1], x[:, 1:], y[:, :-1], y[:, 1:]
    # clip each segment to [0, fpr_limit], interpolating y where it crosses the limit
    xe = np.minimum(x1, fpr_limit)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(x1 > x0, (xe - x0) / (x1 - x0), 1.0)
    ye = y0 + np.clip(t, 0, 1) * (y1 - y0)
    seg = np.where(x0 < fpr_limit, (xe - x0) * (y0 + ye) / 2, 0.0)
    area = seg.sum(1)
    # if the curve ends before the limit (cannot happen: FPR reaches 1), extend it flat
    return area / fpr_limit


def _image_auroc(labels: np.ndarray, scores: np.ndarray, W: np.ndarray) -> np.ndarray:
    d, g = labels == 1, labels == 0
    sd, sg = scores[d], scores[g]
    order = (sd[:, None] > sg[None, :]) + 0.5 * (sd[:, None] == sg[None, :])    # [D x G]
    wd, wg = W[:, d], W[:, g]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.einsum("bd,dg,bg->b", wd, order, wg) / (wd.sum(1) * wg.sum(1))


def weighted_metrics(s: EvalSummary, W: np.ndarray, metrics: Sequence[str] = METRICS) -> dict[str, np.ndarray]:
    """Metrics of the evaluation set with image ``i`` counted ``W[b, i]`` times: ``{name: [B]}``."""
    W = np.atleast_2d(np.asarray(W, np.float32))
    out: dict[str, np.ndarray] = {}
    need_pix = {"pixel_auroc", "pixel_ap", "aupro"} & set(metrics)
    if need_pix:
        pos, neg = W @ s.pos_hist, W @ s.neg_hist
        if "pixel_auroc" in metrics:
            out["pixel_auroc"] = _auroc_from_hists(pos, neg)
        if "pixel_ap" in metrics:
            out["pixel_ap"] = _ap_from_hists(pos, neg)
        if "aupro" in metrics:
            out["aupro"] = _aupro_from_hists(neg, W[:, s.comp_image], s.comp_hist, s.comp_size)
    if "image_auroc" in metrics:
        out["image_auroc"] = _image_auroc(s.labels, s.scores, W)
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise KeyError(f"unknown metric(s) {', '.join(sorted(unknown))}; known: {', '.join(METRICS)}")
    return out


def summary_metrics(s: EvalSummary, metrics: Sequence[str] = METRICS) -> dict[str, float]:
    """The metrics of the whole evaluation set (every image once)."""
    return {k: float(v[0]) for k, v in weighted_metrics(s, np.ones((1, s.n)), metrics).items()}


# ------------------------------------------------------------------------------------------------
# Bootstrap


def bootstrap_weights(labels, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Stratified resampling counts ``[n_boot x N]``: per draw, the defect images and the good
    images are each resampled with replacement to their own number (multinomial counts)."""
    labels = np.asarray(labels).astype(int).ravel()
    rng = np.random.default_rng(seed)
    W = np.zeros((int(n_boot), len(labels)))
    for cls in (1, 0):
        where = np.flatnonzero(labels == cls)
        if len(where):
            W[:, where] = rng.multinomial(len(where), np.full(len(where), 1.0 / len(where)), size=int(n_boot))
    return W


def repeat_indices(k: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """``[n_boot x k]`` repeat indices drawn with replacement from ``0..k-1`` (one row per draw,
    shared by every arm): the literal repeat bootstrap (``repeat_level="multinomial"``). Its own
    stream (``seed`` and a tag), so the image weights of :func:`bootstrap_weights` stay those of
    the same seed."""
    rng = np.random.default_rng([int(seed), 0x5EED])
    return rng.integers(0, int(k), size=(int(n_boot), int(k)))


REPEAT_LEVELS = ("t", "multinomial")


def repeat_weights(k: int, n_boot: int = 1000, seed: int = 0, level: str = "t") -> np.ndarray:
    """The repeat level of the bootstrap: weights ``[n_boot x k]`` (rows sum to 1) of the ``k``
    repeats in each draw, the same for every arm (paired). An arm's draw is ``Σ_k w[b, k]·x[k, b]``.

    ``"multinomial"``: the counts of ``k`` indices drawn with replacement (:func:`repeat_indices`),
    over ``k``. For a few repeats it is over-confident: the spread of the mean of ``k`` values is
    estimated with a factor ``(k − 1)/k`` and normal tails where the honest pivot is Student's
    ``t`` with ``k − 1`` degrees of freedom (measured: 18–20 % false "effects" at 95 % with
    ``k = 5``, 23–26 % with ``k = 3``, when the repeat-to-repeat spread dominates; 3–4 % with
    ``"t"``: docs/STATISTICS.md, ``tests/test_stats_calibration.py``).

    ``"t"`` (default): ``w[b, k] = 1/k + (z[b, k] − mean_k z[b]) / sqrt(k·c[b])``, ``z ~ N(0, 1)``,
    ``c[b] ~ χ²(k − 1)``. Given the repeats' values ``x [k]``, ``Σ_k w·x − mean(x)`` is then
    distributed exactly as ``s/√k · t(k − 1)`` (``s`` their standard deviation), so the percentile
    interval of the repeat level is the t-interval of the mean of ``k`` repeats — at every level,
    Holm's included. Weights can be negative (a linear combination, not a resampled set).
    ``k = 1``: the one repeat (the repeat-to-repeat variation cannot be estimated)."""
    k, B = int(k), int(n_boot)
    if level not in REPEAT_LEVELS:
        raise ValueError(f"repeat level {level!r}; known: {', '.join(REPEAT_LEVELS)}")
    if k == 1:
        return np.ones((B, 1))
    if level == "multinomial":
        R = repeat_indices(k, B, seed)
        return np.stack([np.bincount(r, minlength=k) for r in R]).astype(np.float64) / k if B else np.zeros((0, k))
    rng = np.random.default_rng([int(seed), 0x7D157])
    z = rng.standard_normal((B, k))
    c = rng.chisquare(k - 1, size=(B, 1))
    return 1.0 / k + (z - z.mean(1, keepdims=True)) / np.sqrt(k * c)


# Edge of the order-statistic rank ⌊(n + 1)·a/2⌋ when (n + 1)·a/2 is an integer in exact arithmetic
# but not in floating point (e.g. n = 999, a = 0.05): see _order_interval.
_RANK_EPS = 1e-9


def _finite(draws) -> np.ndarray:
    d = np.asarray(draws, np.float64).ravel()
    return d[np.isfinite(d)]


def _order_interval(d_sorted: np.ndarray, a: float, toward: str = "exclude") -> list[float]:
    """Percentile interval at level ``1 − a`` of ``n`` sorted finite draws: ``[d_(k), d_(n+1−k)]``
    (1-based order statistics), ``k = ⌊(n + 1)·a/2⌋``; ``[-inf, inf]`` where ``k < 1``. It excludes 0
    exactly when ``2·(#tail + 1)/(n + 1) ≤ a`` for one tail, i.e. when :func:`p_value` ``≤ a``.
    ``toward``: how a rank that is an integer up to rounding is read — ``"exclude"`` rounds it up
    (the exact-arithmetic value), ``"include"`` down (one order statistic wider), so that a
    hypothesis that a float comparison did not reject keeps 0 inside its interval."""
    n = len(d_sorted)
    if n == 0:
        return [float("nan"), float("nan")]
    x = (n + 1) * float(a) / 2
    k = int(np.floor(x + _RANK_EPS)) if toward == "exclude" else int(np.floor(x - _RANK_EPS))
    k = min(k, (n + 1) // 2)                  # a ≥ 1 would cross the median: the point interval there
    if k < 1:
        return [float("-inf"), float("inf")]
    return [float(d_sorted[k - 1]), float(d_sorted[n - k])]


def interval(draws: np.ndarray, mean: float) -> dict:
    """``{"mean": mean, "ci95": [lo, hi]}``: the 95 % order-statistic percentile interval of
    ``draws [B]`` (the 25th smallest and 25th largest of 999 or 1000 draws; NaN draws ignored;
    see the module docstring)."""
    d = np.sort(_finite(draws))
    return {"mean": float(mean), "ci95": _order_interval(d, 0.05)}


def p_value(draws: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "the difference is 0" from its draws ``[B]`` (NaN ignored):
    ``min(1, 2·min((#(d ≤ 0) + 1)/(n + 1), (#(d ≥ 0) + 1)/(n + 1)))``; NaN without finite draws.
    A difference that is exactly 0 in every draw gets 1."""
    d = _finite(draws)
    n = len(d)
    if n == 0:
        return float("nan")
    lo, hi = int((d <= 0).sum()), int((d >= 0).sum())
    return float(min(1.0, 2.0 * min(lo + 1, hi + 1) / (n + 1)))


def verdict(ci: Sequence[float]) -> str:
    """``helped`` when the delta's interval lies entirely above 0, ``hurt`` when entirely below,
    else ``no detectable effect``."""
    lo, hi = float(ci[0]), float(ci[1])
    if lo > 0:
        return "helped"
    if hi < 0:
        return "hurt"
    return "no detectable effect"


def _folds_of(name: str, k: int, rep) -> list[EvalSummary]:
    if isinstance(rep, EvalSummary):
        return [rep]
    folds = list(rep) if isinstance(rep, (list, tuple)) else None
    if not folds or not all(isinstance(s, EvalSummary) for s in folds):
        raise ValueError(f"arm {name!r}, repeat {k}: expected an EvalSummary or a non-empty list of "
                         f"EvalSummary (one per fold), got {type(rep).__name__}")
    return folds


def _layout(arms: Mapping[str, Sequence]) -> tuple[dict[str, list[list[EvalSummary]]], np.ndarray, np.ndarray]:
    """Validate ``arms`` (name → ``K`` repeats → ``F`` folds) → (name → ``[K][F]`` summaries, the
    union of the folds' ids ``[U]`` sorted, their labels ``[U]``)."""
    if not arms:
        raise ValueError("no arms to compare")
    grid: dict[str, list[list[EvalSummary]]] = {}
    for name, reps in arms.items():
        if isinstance(reps, EvalSummary) or not len(reps):
            raise ValueError(f"arm {name!r} has no repeats (expected a list of K repeats)")
        grid[name] = [_folds_of(name, k, rep) for k, rep in enumerate(reps)]
    first = next(iter(grid))
    ref = grid[first][0]
    K, F = len(grid[first]), len(ref)
    for name, reps in grid.items():
        if len(reps) != K:
            raise ValueError(f"arm {name!r} has {len(reps)} repeats, arm {first!r} {K}: every arm needs the "
                             f"same repeats (repeat k of every arm shares seed k)")
        for k, folds in enumerate(reps):
            if len(folds) != F:
                raise ValueError(f"arm {name!r}, repeat {k} has {len(folds)} folds, arm {first!r} {F}: "
                                 f"every arm and repeat needs the same folds")
            for f, s in enumerate(folds):
                r = ref[f]
                if s.n != r.n or not np.array_equal(s.ids, r.ids) or not np.array_equal(s.labels, r.labels):
                    where = f" (fold {f})" if F > 1 else ""
                    raise ValueError(f"arm {name!r}, repeat {k}{where} was not scored on the same evaluation "
                                     f"images as arm {first!r}, repeat 0 (ids or labels differ)")
    ids = np.concatenate([s.ids for s in ref])
    labels = np.concatenate([s.labels for s in ref]).astype(int)
    uid, inv = np.unique(ids, return_inverse=True)
    ulab = np.full(len(uid), -1)
    ulab[inv] = labels
    if not np.array_equal(ulab[inv], labels):
        bad = uid[np.flatnonzero(np.bincount(inv, weights=labels) % np.bincount(inv) != 0)[:5]]
        raise ValueError(f"image id(s) {bad.tolist()} are labelled defective in one fold and good in another")
    count = np.bincount(inv)
    twice = uid[(count > 1) & (ulab == 1)]
    if len(twice):
        raise ValueError(f"defect image id(s) {twice[:5].tolist()} appear in more than one fold: a defect "
                         f"must be evaluated in exactly one fold (pass the global ids to summarize)")
    return grid, uid, ulab


def compare(arms: Mapping[str, Sequence], deltas: Mapping[str, tuple[str, str]] | None = None,
            n_boot: int = 1000, seed: int = 0, metrics: Sequence[str] = METRICS,
            resample_repeats: bool = True, repeat_level: str = "t") -> dict:
    """Paired two-level bootstrap over arms (module docstring).

    ``arms``: name → the ``K`` repeats, each one :class:`EvalSummary` or a list of ``F`` of them,
    one per fold; every arm has the same ``K`` and the same folds (the same ids per fold).
    ``deltas``: name → ``(arm_b, arm_a)``, the difference ``b − a``. ``resample_repeats=False``:
    the image-only bootstrap (every draw averages all ``K`` repeats; over-confident, for tests).
    ``repeat_level``: how the repeats are resampled (:func:`repeat_weights`): ``"t"`` (default,
    calibrated for few repeats) or ``"multinomial"`` (``K`` indices with replacement; too narrow
    for few repeats, kept for comparison).

    Returns ``{"arms": {arm: {metric: {"mean", "ci95"}}}, "deltas": {name: {metric: {"mean",
    "ci95", "p", "verdict", "draws"}}}, "n_boot", "seed"}``: ``mean`` the metric of the full
    evaluation set averaged over folds, then repeats; ``ci95`` the 95 % percentile interval of the
    ``B`` draws; ``p`` the two-sided bootstrap p-value (:func:`p_value`); ``verdict`` the
    unadjusted one (:func:`verdict` of ``ci95``); ``draws`` the delta's ``[B]`` draws, for
    :func:`holm` (which removes them; :func:`strip_draws` for blocks reported without a verdict).

    Shapes: weights ``[B x U]`` over the ``U`` distinct ids, fold ``f``'s columns ``[B x N_f]``;
    per (arm, repeat, fold) one ``[B]`` vector per metric; per arm ``[K x B]`` fold means, combined
    with the repeat weights ``[B x K]`` → ``[B]``."""
    deltas = dict(deltas or {})
    grid, uid, ulab = _layout(arms)
    names = list(grid)
    for d, (b, a) in deltas.items():
        if b not in grid or a not in grid:
            raise KeyError(f"delta {d!r} names an unknown arm ({b!r} or {a!r}); arms: {', '.join(names)}")
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise KeyError(f"unknown metric(s) {', '.join(sorted(unknown))}; known: {', '.join(METRICS)}")
    B = int(n_boot)
    K = len(grid[names[0]])
    W = bootstrap_weights(ulab, B, seed)                                          # [B x U]
    cols = [np.searchsorted(uid, s.ids) for s in grid[names[0]][0]]               # F x [N_f]
    Wf = [W[:, c] for c in cols]
    Wr = repeat_weights(K, B, seed, repeat_level) if resample_repeats else np.full((B, K), 1.0 / K)  # [B x K]
    draws: dict[str, dict[str, np.ndarray]] = {}
    means: dict[str, dict[str, float]] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for name, reps in grid.items():
            per_k = {m: np.empty((K, B)) for m in metrics}                        # fold means [K x B]
            full_k = {m: np.empty(K) for m in metrics}
            for k, folds in enumerate(reps):
                boot = [weighted_metrics(s, w, metrics) for s, w in zip(folds, Wf)]
                full = [weighted_metrics(s, np.ones((1, s.n)), metrics) for s in folds]
                with warnings.catch_warnings():                                   # all folds NaN → NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    for m in metrics:
                        per_k[m][k] = np.nanmean(np.stack([r[m] for r in boot]), axis=0)
                        full_k[m][k] = np.nanmean([r[m][0] for r in full])
            draws[name] = {m: (per_k[m].T * Wr).sum(1) for m in metrics}          # [B]
            means[name] = {m: float(full_k[m].mean()) for m in metrics}
    out_arms = {name: {m: interval(draws[name][m], means[name][m]) for m in metrics} for name in names}
    out_deltas = {}
    for d, (b, a) in deltas.items():
        block = {}
        for m in metrics:
            dd = draws[b][m] - draws[a][m]
            iv = interval(dd, means[b][m] - means[a][m])
            block[m] = {**iv, "p": p_value(dd), "verdict": verdict(iv["ci95"]), "draws": dd}
        out_deltas[d] = block
    return {"arms": out_arms, "deltas": out_deltas, "n_boot": B, "seed": int(seed)}


# ------------------------------------------------------------------------------------------------
# Multiple comparisons


def holm(blocks: Sequence[dict], alpha: float = 0.05) -> None:
    """Holm–Bonferroni step-down over a *family* of ``m`` delta metric blocks (each a dict from
    :func:`compare` with ``"p"`` and ``"draws" [B]``), in place. Per block it sets

    * ``p_normal``: the two-sided p-value of the normal approximation of its draws
      (``erfc(|mean| / (sd·√2))``, ``sd`` the draws' standard deviation) — the family's p-values;
    * ``p_holm``: the Holm-adjusted p-value ``max_{j ≤ r} min(1, (m − j + 1)·p_(j))`` (monotone in
      the rank ``r`` of its p-value; NaN p-values rank last and stay unadjusted NaN);
    * ``family_size``: ``m``;
    * ``level`` and ``ci_adjusted``: ``mean ± z_{1−a/2}·sd`` at that level (normal approximation:
      percentiles of 1000 draws cannot reach the levels a family of dozens needs) — a
      rejected hypothesis (``p_holm ≤ alpha``) at rank ``r`` gets ``1 − alpha/(m − r + 1)``, the
      level at which it was tested; every other one ``1 − alpha/(m − s + 1)``, ``s`` the rank of
      the first non-rejected one (where the step-down stopped), so its interval contains 0;
    * ``verdict``: ``helped`` / ``hurt`` if rejected and ``ci_adjusted`` is entirely above / below
      0, else ``no detectable effect`` (a rejected block whose interval still touches 0 — only
      possible when ``p`` was not computed from these draws — is ``no detectable effect``, its
      ``p_holm`` kept as is);

    and deletes ``draws``. ``m = 1`` is the ordinary 95 % interval and verdict. ``ci95`` and ``p``
    stay (unadjusted)."""
    blocks = list(blocks)
    m = len(blocks)
    if not m:
        return
    if len({id(b) for b in blocks}) != m:
        raise ValueError("the same block appears twice in the family")
    for i, b in enumerate(blocks):
        if "draws" not in b or "p" not in b:
            raise ValueError(f"block {i} of the family has no 'p' or no 'draws' (already adjusted, or not "
                             f"a delta block of compare)")
    alpha = float(alpha)
    from scipy.special import ndtri   # here, not at import: the studio's first page loads this module
    # Normal approximation of each difference's bootstrap distribution: mean ± z·sd(draws). A run's
    # family holds dozens of verdicts, so Holm tests at levels like 0.05/72 = 0.0007, which 1000
    # draws cannot resolve by counting (the smallest percentile p-value is 2/1001, and a percentile
    # interval at 99.93 % has no order statistic left): the normal tail can.
    stats_ = []
    for b in blocks:
        d = _finite(b["draws"])
        sd = float(np.std(d, ddof=1)) if len(d) > 1 else float("nan")
        mean = float(b["mean"])
        if not np.isfinite(sd) or not np.isfinite(mean):
            pn = float("nan")
        elif sd == 0:
            pn = 1.0 if mean == 0 else 0.0
        else:
            pn = float(math.erfc(abs(mean) / sd / math.sqrt(2.0)))
        stats_.append((mean, sd, pn))
    p = np.array([x[2] for x in stats_])
    order = np.argsort(np.where(np.isnan(p), np.inf, p), kind="stable")
    ps = p[order]
    adj = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * np.where(np.isnan(ps), 1.0, ps)))
    rejected = adj <= alpha
    s = int(np.argmin(rejected)) + 1 if not rejected.all() else m + 1     # rank of the first non-rejected
    for r0, i in enumerate(order):
        b, r = blocks[i], r0 + 1
        a = alpha / (m - r + 1) if rejected[r0] else alpha / (m - s + 1)
        b.pop("draws")
        mean, sd, pn = stats_[i]
        half = float(ndtri(1.0 - a / 2.0)) * sd if np.isfinite(sd) else float("nan")
        ci = [mean - half, mean + half]
        v = verdict(ci) if rejected[r0] else "no detectable effect"
        b.update({"p_normal": pn, "p_holm": float("nan") if np.isnan(ps[r0]) else float(adj[r0]),
                  "family_size": m, "level": 1.0 - a, "ci_adjusted": ci, "verdict": v})


def strip_draws(obj):
    """Remove every ``"draws"`` key from nested dicts / lists / tuples, in place (blocks reported
    without a verdict, e.g. exploratory per-type rows, before writing JSON). Returns ``obj``."""
    if isinstance(obj, dict):
        obj.pop("draws", None)
        for v in obj.values():
            strip_draws(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            strip_draws(v)
    return obj


__all__ = ["METRICS", "VERDICTS", "EvalSummary", "default_bins", "summarize", "weighted_metrics", "summary_metrics",
           "bootstrap_weights", "repeat_indices", "repeat_weights", "REPEAT_LEVELS", "interval", "p_value", "verdict", "compare", "holm", "strip_draws"]
