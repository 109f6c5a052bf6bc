"""Pictures people would rather look at than read: heatmap overlays and comparison panels."""
from __future__ import annotations

import cv2
import numpy as np


def heatmap(amap: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """[H x W] float → [H x W x 3] uint8 RGB (JET), scaled to [vmin, vmax] (default: map range)."""
    amap = np.asarray(amap, np.float32)
    lo = float(np.min(amap)) if vmin is None else vmin
    hi = float(np.max(amap)) if vmax is None else vmax
    norm = np.clip((amap - lo) / max(hi - lo, 1e-8), 0, 1)
    return cv2.cvtColor(cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET),
                        cv2.COLOR_BGR2RGB)


def overlay(image: np.ndarray, amap: np.ndarray, vmin=None, vmax=None, alpha: float = 0.45) -> np.ndarray:
    """Heatmap blended over the image (resized to the image when shapes differ)."""
    if amap.shape[:2] != image.shape[:2]:
        amap = cv2.resize(amap.astype(np.float32), (image.shape[1], image.shape[0]),
                          interpolation=cv2.INTER_LINEAR)
    return (image * (1 - alpha) + heatmap(amap, vmin, vmax) * alpha).astype(np.uint8)


def contour(image: np.ndarray, mask: np.ndarray, colour=(0, 255, 0), thickness: int = 1) -> np.ndarray:
    """Draw the outline of a binary mask on a copy of the image."""
    out = np.ascontiguousarray(image.copy())
    cnts, _ = cv2.findContours((np.asarray(mask) > 0).astype(np.uint8), cv2.RETR_EXTERNAL,
                               cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, cnts, -1, colour, thickness)
    return out


def panel(image: np.ndarray, gt: np.ndarray | None, amap: np.ndarray, threshold: float | None,
          vmin=None, vmax=None) -> np.ndarray:
    """Input | ground truth | heatmap overlay | thresholded mask, side by side: [H x 4W x 3]."""
    h, w = image.shape[:2]
    gt_img = contour(image, gt, (0, 255, 0), 2) if gt is not None and np.any(gt) else image.copy()
    ov = overlay(image, amap, vmin, vmax)
    if threshold is not None:
        pred = (cv2.resize(amap.astype(np.float32), (w, h)) >= threshold)
        th = contour(image, pred, (255, 40, 40), 2)
        if gt is not None and np.any(gt):
            th = contour(th, gt, (0, 255, 0), 1)
    else:
        th = image.copy()
    sep = np.full((h, 3, 3), 255, np.uint8)
    return np.concatenate([image, sep, gt_img, sep, ov, sep, th], axis=1)
