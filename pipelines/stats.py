"""Bootstrap confidence intervals for anomaly-detection metrics, paired between arms.

The experiment asks "did synthetic data help?" of two (or more) *arms* (e.g. a positive bank of
reference defects only vs reference + synthetic), each run ``K`` times (repeats with different
seeds) and scored on the **same** evaluation images. A difference is only called an effect when
its 95 % bootstrap interval excludes zero (:func:`verdict`) — never from a point estimate.

Resampling: a draw resamples the evaluation *images* with replacement, stratified (the defect
images and the good images separately, so every draw has both), as multinomial counts
``W: [B x N]``. The same draw is applied to every arm and every repeat (paired), and within a
draw each arm's metric is averaged over its ``K`` repeats. So the interval covers the
evaluation-set sampling (which images happened to be evaluated) and the repeat-to-repeat
variation enters through the average. Seeded: the same inputs give the same intervals.

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
* image AUROC from the pairwise order matrix of defect vs good image scores.

With 4096 bins (256 px images and up) the binned metrics on the full set equal
:mod:`pipelines.metrics` 's to about 1e-3 (tested; a bin's pixels count as ties, so AUROC is off
by at most half a bin's share of the normal pixels); the reported ``mean`` is the binned metric on the full set, averaged over the
repeats, so the mean and its interval come from one estimator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

METRICS = ("pixel_auroc", "pixel_ap", "aupro", "image_auroc")
VERDICTS = ("helped", "no detectable effect", "hurt")
DEFAULT_BINS = 4096
FPR_LIMIT = 0.3


@dataclass
class EvalSummary:
    """Sufficient statistics of one run (one arm, one repeat) on an evaluation set of ``N`` images.

    labels ``[N]`` (1 = defective image), scores ``[N]`` image scores, pos_hist / neg_hist
    ``[N x bins]`` defect / normal pixel counts per score bin, comp_image ``[C]`` the image of each
    ground-truth region, comp_hist ``[C x bins]`` its pixel counts per bin, comp_size ``[C]``."""
    labels: np.ndarray
    scores: np.ndarray
    pos_hist: np.ndarray
    neg_hist: np.ndarray
    comp_image: np.ndarray
    comp_hist: np.ndarray
    comp_size: np.ndarray

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
                           new_of[self.comp_image[keep]], self.comp_hist[keep], self.comp_size[keep])


def default_bins(n_pixels: int) -> int:
    """Bins for ``n_pixels`` scored pixels: ~256 pixels per bin, 256..:data:`DEFAULT_BINS`."""
    return int(min(DEFAULT_BINS, max(256, n_pixels // 256)))


def summarize(labels, scores, masks, maps, bins: int | None = None) -> EvalSummary:
    """``labels [N]``, ``scores [N]``, ``masks [N x H x W]`` bool, ``maps [N x H x W]`` float →
    :class:`EvalSummary`. Bin edges: quantiles of all of ``maps``' pixels (so bins are fine where
    the scores are dense, finer towards the top); pixels of one bin are ties. ``bins``: default
    :func:`default_bins`."""
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
                       np.concatenate(comp_size).astype(np.float32) if comp_size else np.zeros(0, np.float32))


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


def interval(draws: np.ndarray, mean: float) -> dict:
    """``{"mean": mean, "ci95": [2.5th, 97.5th percentile of draws]}`` (NaN draws ignored)."""
    d = np.asarray(draws, np.float64)
    d = d[np.isfinite(d)]
    lo, hi = (np.percentile(d, [2.5, 97.5]) if d.size else (float("nan"), float("nan")))
    return {"mean": float(mean), "ci95": [float(lo), float(hi)]}


def verdict(ci: Sequence[float]) -> str:
    """``helped`` when the delta's interval lies entirely above 0, ``hurt`` when entirely below,
    else ``no detectable effect``."""
    lo, hi = float(ci[0]), float(ci[1])
    if lo > 0:
        return "helped"
    if hi < 0:
        return "hurt"
    return "no detectable effect"


def compare(arms: Mapping[str, Sequence[EvalSummary]], deltas: Mapping[str, tuple[str, str]] | None = None,
            n_boot: int = 1000, seed: int = 0, metrics: Sequence[str] = METRICS) -> dict:
    """Paired bootstrap over arms.

    ``arms``: name → the ``K`` repeats' :class:`EvalSummary` (all on the same images, same order).
    ``deltas``: name → ``(arm_b, arm_a)``, the difference ``b − a``.
    Returns ``{"arms": {arm: {metric: {"mean", "ci95"}}}, "deltas": {name: {metric: {"mean",
    "ci95", "verdict"}}}, "n_boot", "seed"}``; ``mean`` is the metric of the full evaluation set
    averaged over the repeats, ``ci95`` the percentile interval of that average over the draws."""
    deltas = dict(deltas or {})
    names = list(arms)
    if not names:
        raise ValueError("no arms to compare")
    ref = next(iter(arms.values()))[0]
    for name, reps in arms.items():
        if not reps:
            raise ValueError(f"arm {name!r} has no repeats")
        for s in reps:
            if s.n != ref.n or not np.array_equal(s.labels, ref.labels):
                raise ValueError(f"arm {name!r} was not scored on the same evaluation images as the others")
    for d, (b, a) in deltas.items():
        if b not in arms or a not in arms:
            raise KeyError(f"delta {d!r} names an unknown arm ({b!r} or {a!r}); arms: {', '.join(names)}")
    W = bootstrap_weights(ref.labels, n_boot, seed)
    one = np.ones((1, ref.n))
    draws: dict[str, dict[str, np.ndarray]] = {}
    means: dict[str, dict[str, float]] = {}
    for name, reps in arms.items():
        per_rep = [weighted_metrics(s, W, metrics) for s in reps]
        full = [weighted_metrics(s, one, metrics) for s in reps]
        draws[name] = {k: np.mean([r[k] for r in per_rep], axis=0) for k in metrics}
        means[name] = {k: float(np.mean([f[k][0] for f in full])) for k in metrics}
    out_arms = {name: {k: interval(draws[name][k], means[name][k]) for k in metrics} for name in names}
    out_deltas = {}
    for d, (b, a) in deltas.items():
        block = {}
        for k in metrics:
            iv = interval(draws[b][k] - draws[a][k], means[b][k] - means[a][k])
            block[k] = {**iv, "verdict": verdict(iv["ci95"])}
        out_deltas[d] = block
    return {"arms": out_arms, "deltas": out_deltas, "n_boot": int(n_boot), "seed": int(seed)}


__all__ = ["METRICS", "VERDICTS", "EvalSummary", "default_bins", "summarize", "weighted_metrics", "summary_metrics",
           "bootstrap_weights", "interval", "verdict", "compare"]
