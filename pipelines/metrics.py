"""Anomaly-detection metrics shared by PatchCore, DDPM residual maps and experiments.

All functions take plain numpy arrays:
  labels: [N] 0/1 (1 = defective image)        scores: [N] float (higher = more anomalous)
  masks:  [N x H x W] bool ground truth         maps:   [N x H x W] float anomaly maps
scikit-learn computes ROC/PR curves; AUPRO (Bergmann et al., MVTec AD) is computed here on an
exact FPR grid because no library in our stack provides it.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve


class MetricError(ValueError):
    """The inputs cannot give the metric (e.g. one class only); the message says why."""


def _two_classes(y: np.ndarray, what: str) -> None:
    if y.size == 0:
        raise MetricError(f"{what}: no samples")
    if y.min() == y.max():
        kind = "defective" if y.max() else "good"
        raise MetricError(f"{what}: all {y.size} samples are {kind}; AUROC needs both good and defective")


def image_auroc(labels, scores) -> float:
    y = np.asarray(labels).astype(int).ravel()
    _two_classes(y, "image AUROC")
    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64).ravel()))


def image_roc(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for plotting."""
    y = np.asarray(labels).astype(int).ravel()
    _two_classes(y, "image ROC")
    return roc_curve(y, np.asarray(scores, dtype=np.float64).ravel())


def pixel_auroc(masks, maps) -> float:
    y = np.asarray(masks).astype(bool).ravel()
    _two_classes(y, "pixel AUROC")
    return float(roc_auc_score(y, np.asarray(maps, dtype=np.float32).ravel()))


def pixel_ap(masks, maps) -> float:
    """Pixel-level average precision (area under the precision-recall curve, scikit-learn's
    step-wise definition): the segmentation metric of DRAEM and of supervised defect
    segmenters, more sensitive than pixel AUROC when defect pixels are rare."""
    y = np.asarray(masks).astype(bool).ravel()
    _two_classes(y, "pixel AP")
    return float(average_precision_score(y, np.asarray(maps, dtype=np.float32).ravel()))


def f1_max(labels, scores) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold that reaches it (score >= threshold)."""
    y = np.asarray(labels).astype(bool).ravel()
    _two_classes(y, "F1-max")
    precision, recall, thresholds = precision_recall_curve(y, np.asarray(scores, np.float64).ravel())
    f1 = 2 * precision * recall / np.clip(precision + recall, 1e-12, None)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    return float(f1[best]), float(thresholds[best]) if len(thresholds) else float("nan")


def pro_curve(masks, maps, fpr_limit: float = 0.3, steps: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Per-region overlap vs false-positive rate, on a uniform FPR grid in [0, fpr_limit].

    Thresholds are the quantiles of the scores of *normal* pixels, so FPR(threshold_k) = fpr_k
    exactly (up to ties). PRO = mean over all ground-truth connected components (8-connectivity,
    over all images) of the fraction of the component predicted anomalous.
    """
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float32)
    if masks.shape != maps.shape:
        raise MetricError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    if not masks.any():
        raise MetricError("AUPRO: no defect pixels in the ground truth")
    if masks.all():
        raise MetricError("AUPRO: no normal pixels in the ground truth")
    labels = np.zeros(masks.shape, np.int64)
    offset = 0
    for i in range(masks.shape[0]):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3), int))
        labels[i][lab > 0] = lab[lab > 0] + offset
        offset += n
    comp = labels.ravel()
    flat = maps.ravel()
    pos = comp > 0
    comp_sizes = np.bincount(comp[pos], minlength=offset + 1)[1:].astype(np.float64)
    neg_scores = np.sort(flat[~pos])
    fprs = np.linspace(0.0, fpr_limit, steps)
    # threshold t_k: the fraction of normal pixels with score > t_k equals fprs[k]
    idx = np.clip(np.ceil((1.0 - fprs) * neg_scores.size).astype(int) - 1, 0, neg_scores.size - 1)
    thresholds = neg_scores[idx]
    thresholds[0] = np.nextafter(neg_scores[-1], np.inf)  # FPR 0: nothing normal above it
    pos_scores, pos_comp = flat[pos], comp[pos]
    order = np.argsort(pos_scores)
    pos_scores, pos_comp = pos_scores[order], pos_comp[order]
    pros = np.empty(steps)
    real_fprs = np.empty(steps)
    for k, t in enumerate(thresholds):
        start = np.searchsorted(pos_scores, t, side="right")
        hits = np.bincount(pos_comp[start:], minlength=offset + 1)[1:]
        pros[k] = np.mean(hits / comp_sizes)
        real_fprs[k] = (neg_scores.size - np.searchsorted(neg_scores, t, side="right")) / neg_scores.size
    return real_fprs, pros


def aupro(masks, maps, fpr_limit: float = 0.3, steps: int = 300) -> float:
    """Area under the PRO curve up to ``fpr_limit``, normalised to [0, 1]."""
    fprs, pros = pro_curve(masks, maps, fpr_limit, steps)
    fprs, pros = np.concatenate([[0.0], fprs, [fpr_limit]]), np.concatenate([[0.0], pros, [pros[-1]]])
    keep = fprs <= fpr_limit
    return float(np.trapezoid(pros[keep], fprs[keep]) / fpr_limit)


def evaluate(labels, scores, masks=None, maps=None, fpr_limit: float = 0.3) -> dict:
    """All metrics the studio reports. Pixel metrics need ``masks`` and ``maps``."""
    out: dict = {"image_auroc": image_auroc(labels, scores)}
    out["image_f1_max"], out["image_threshold"] = f1_max(labels, scores)
    if masks is not None and maps is not None:
        out["pixel_auroc"] = pixel_auroc(masks, maps)
        out["aupro"] = aupro(masks, maps, fpr_limit)
        out["pixel_f1_max"], out["pixel_threshold"] = f1_max(np.asarray(masks).ravel(),
                                                             np.asarray(maps).ravel())
    return out
