"""PatchCore's inputs and outputs: images → uint8 RGB at the working size, patch scores →
smoothed anomaly maps, and the held-out positives split."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipelines.mvtec import Category, TestSample, load_image


def as_rgb(img) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an RGB image [H x W x 3], got an array of shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.shape[2] == 4:
        a = a[..., :3]
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        if a.max(initial=0) <= 1.0:
            a = a * 255.0
        a = np.clip(a + 0.5, 0, 255).astype(np.uint8)
    return a


def image_list(images, size: int) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Inputs → list of uint8 RGB ``[size x size x 3]`` and the original (H, W) of each."""
    if isinstance(images, (str, Path)):
        raise TypeError("pass a list of images (or paths); for a category folder use fit_folder()")
    if isinstance(images, np.ndarray) and images.ndim != 4:
        raise ValueError(f"expected a list of images or an array [N x H x W x 3], got an array of "
                         f"shape {images.shape} (wrap a single image in a list)")
    out, shapes = [], []
    for img in images:
        a = load_image(Path(img), None) if isinstance(img, (str, Path)) else as_rgb(img)
        shapes.append(a.shape[:2])
        if a.shape[:2] != (size, size):
            a = cv2.resize(a, (size, size), interpolation=cv2.INTER_AREA)
        out.append(np.ascontiguousarray(a))
    if not out:
        raise ValueError("no images given")
    return out, shapes


def gaussian_blur(maps: np.ndarray, sigma: float = 4.0) -> np.ndarray:
    """Gaussian smoothing of ``maps: [N x H x W]`` float32 (kernel truncated at 4σ, reflected
    border, like ``scipy.ndimage.gaussian_filter``); OpenCV's separable filter, in place."""
    if sigma <= 0:
        return maps
    k = 2 * int(4 * sigma + 0.5) + 1
    for i in range(len(maps)):
        maps[i] = cv2.GaussianBlur(maps[i], (k, k), sigma, borderType=cv2.BORDER_REFLECT_101)
    return maps


def patch_to_maps(patch: np.ndarray, size: int, sigma: float = 4.0) -> np.ndarray:
    """Patch scores ``[N x h x w]`` → anomaly maps ``[N x size x size]``: bilinear upsampling
    (half-pixel centres, as ``F.interpolate(align_corners=False)``), then Gaussian σ."""
    out = np.empty((len(patch), size, size), np.float32)
    for i, p in enumerate(patch):
        out[i] = cv2.resize(np.ascontiguousarray(p, np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    return gaussian_blur(out, sigma)


def split_positives(category: Category, fraction: float = 0.3, seed: int = 0
                    ) -> tuple[list[TestSample], list[TestSample]]:
    """Hold out ``fraction`` of each defect type's test images for a positive bank.

    Returns ``(bank_samples, eval_samples)``: disjoint; ``eval_samples`` keeps every good test
    image and the remaining defects, in the category's order. Deterministic in ``seed``: each
    type's images are sorted by path and permuted by ``numpy.random.default_rng((seed, i))``
    (``i`` = the type's index in sorted order). Per type, ``round(fraction · n)`` images are held
    out, at least 1 and at most ``n − 1`` (a type with a single image stays in the evaluation).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    bank: set[Path] = set()
    for i, label in enumerate(sorted({s.label for s in category.test if s.is_anomaly})):
        paths = sorted(s.path for s in category.test if s.label == label)
        if len(paths) < 2:
            continue
        k = min(max(1, round(fraction * len(paths))), len(paths) - 1)
        order = np.random.default_rng((seed, i)).permutation(len(paths))
        bank.update(paths[j] for j in order[:k])
    bank_samples = [s for s in category.test if s.path in bank]
    eval_samples = [s for s in category.test if s.path not in bank]
    return bank_samples, eval_samples
