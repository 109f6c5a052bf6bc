"""A light supervised defect segmenter on frozen backbone features — the downstream test of
synthetic defects (DRAEM / AnomalyDiffusion style: "does training on them find real defects?").

Pieces, kept apart:

* :class:`DefectSegmenter` (``nn.Module``, no training code): frozen feature maps of two stages
  (strides 8 and 16 at 256 px; EfficientNet-Lite0: 40 and 112 channels) → per-channel
  standardisation (fixed statistics of the training set, buffers) → a 1×1 lateral conv per stage
  to ``hidden`` channels → the coarser map bilinearly upsampled to the finer grid → concatenated →
  3×3 conv + ReLU → 3×3 conv to one logit: ``logits: [B x 1 x h x w]`` on the stride-8 grid.
  The last conv starts at zero weight and a prior bias (``logit(prior)``, as RetinaNet's
  classifier), so an untrained segmenter outputs a constant map (pixel AUROC exactly 0.5).
* :class:`FeatureCache`: runs the frozen backbone once per image (``torch.inference_mode``) and
  keeps the maps, so each of the many trainings of an experiment costs only the decoder.
* :func:`train_segmenter`: the training loop — AdamW, a fixed number of steps, batches drawn
  half from defect images and half from negatives (empty masks); samples marked ``extra``
  (synthetic defects added to real ones) come *on top* of those batches — as many extra
  positives per batch as real ones — so adding synthetic defects never dilutes how often the
  segmenter sees each real defect (a real-only and a real + synthetic training see the same
  real batches, in the same order, plus the synthetic ones); random horizontal / vertical
  flips of features and masks, loss = BCE + soft Dice on the masks area-downsampled to the
  feature grid (soft targets). Seeded (``torch.Generator``), so the same inputs give the same
  weights.
* :func:`predict_maps`: sigmoid → bilinear upsampling to ``size`` → Gaussian smoothing
  (σ = 4 px, as PatchCore's maps) → ``maps: [N x size x size]``; image score = max of the map.

CPU budget (2 cores, EfficientNet-Lite0 at 256 px): features ~0.15 s per image, once; one
training of the default 300 steps × batch 16 (hidden 32) takes ~3–6 s, whatever the training set
size; prediction of a few dozen images well under a second. Nothing is loaded at import time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.training import CancelFn, Cancelled, ProgressFn   # the one cancel exception


# ------------------------------------------------------------------------------------------------
# The module


class DefectSegmenter(nn.Module):
    """Stacked feature maps → defect logits on the finest grid.

    ``forward(features)``: ``[B x C x h x w]`` (the output of :func:`stack_features`, ``C`` =
    ``sum(channels)``) or the per-stage list it is made from → ``logits: [B x 1 x h x w]``.
    """

    def __init__(self, channels: Sequence[int], hidden: int = 32, prior: float = 0.02):
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        c = sum(self.channels)
        # per-channel standardisation with fixed training-set statistics (set_feature_stats)
        self.register_buffer("mean", torch.zeros(1, c, 1, 1))
        self.register_buffer("std", torch.ones(1, c, 1, 1))
        self.reduce = nn.Conv2d(c, hidden, 1)                       # 1×1: every stage → hidden
        self.fuse = nn.Conv2d(hidden, hidden // 2, 3, padding=1)    # 3×3: local context
        self.out = nn.Conv2d(hidden // 2, 1, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.out.bias, math.log(prior / (1 - prior)))

    def set_feature_stats(self, features: torch.Tensor) -> None:
        """Fix the standardisation from training features ``[N x C x h x w]``."""
        self.mean.copy_(features.mean(dim=(0, 2, 3), keepdim=True))
        self.std.copy_(features.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-4))

    def forward(self, features) -> torch.Tensor:
        x = stack_features(features) if isinstance(features, (list, tuple)) else features
        # the standardisation folded into the 1×1 conv: W·(x − μ)/σ + b = (W/σ)·x + (b − (W/σ)·μ)
        w = self.reduce.weight / self.std.view(1, -1, 1, 1)
        b = self.reduce.bias - (w * self.mean.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
        x = F.relu(F.conv2d(x, w, b))
        x = F.relu(self.fuse(x))
        return self.out(x)


def stack_features(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-stage maps ``[N x C_l x h_l x w_l]`` (finest first) → ``[N x sum(C_l) x h_0 x w_0]``:
    coarser maps bilinearly upsampled to the finest grid, then concatenated. Done once per image
    (a 1×1 conv commutes with bilinear upsampling, so nothing is lost by upsampling first)."""
    h, w = maps[0].shape[-2:]
    return torch.cat([m if m.shape[-2:] == (h, w) else
                      F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False) for m in maps], 1)


# ------------------------------------------------------------------------------------------------
# Frozen features, once per image


class FeatureCache:
    """Frozen backbone features of images, computed once: ``features(images) -> [N x C x h x w]``
    (:func:`stack_features` of the backbone's stages; float32, CPU). ``extractor`` is a
    :class:`pipelines.backbones.FeatureExtractor` (``build_backbone(name)``)."""

    def __init__(self, extractor, batch_size: int = 8):
        self.extractor = extractor
        self.batch_size = int(batch_size)

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(self.extractor.channels)

    @torch.inference_mode()
    def features(self, images: Sequence[np.ndarray], cancelled: CancelFn | None = None) -> torch.Tensor:
        """``images``: uint8 RGB ``[H x W x 3]`` of one size → ``[N x C x h x w]``."""
        if len(images) == 0:
            raise ValueError("no images given")
        out = []
        for start in range(0, len(images), self.batch_size):
            if cancelled is not None and cancelled():
                raise Cancelled("segmenter features cancelled")
            x = torch.from_numpy(np.stack(images[start:start + self.batch_size])).permute(0, 3, 1, 2)
            out.append(stack_features(self.extractor(x.float().div_(255.0))).clone())
        return torch.cat(out)


def masks_to_grid(masks: Sequence[np.ndarray], hw: tuple[int, int]) -> torch.Tensor:
    """Masks ``[H x W]`` (nonzero = defect) → soft targets ``[N x 1 x h x w]``: the defect share of
    each feature cell (area averaging)."""
    h, w = hw
    out = np.stack([cv2.resize((np.asarray(m) > 0).astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
                    for m in masks])
    return torch.from_numpy(out)[:, None]


# ------------------------------------------------------------------------------------------------
# Training (kept apart from the module)


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    hidden: int = 32
    dice_weight: float = 1.0
    defect_share: float = 0.5       # share of each batch drawn from images with a defect
    flip: bool = True               # random horizontal / vertical flips of each batch
    seed: int = 0
    extra_per_batch: int | None = None   # synthetic ("extra") positives added to each batch; None:
                                         # as many as the batch's real positives


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0) -> torch.Tensor:
    """BCE (mean over cells) + ``dice_weight`` × soft Dice loss over the whole batch (so a batch
    of empty masks gives a finite loss). ``logits``, ``target``: ``[B x 1 x h x w]``."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    if dice_weight <= 0:
        return bce
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    dice = 1 - (2 * inter + 1.0) / (p.sum() + target.sum() + 1.0)
    return bce + dice_weight * dice


def train_segmenter(features: torch.Tensor, masks: Sequence[np.ndarray] | torch.Tensor,
                    cfg: TrainConfig | None = None, channels: Sequence[int] | None = None,
                    progress: ProgressFn | None = None, cancelled: CancelFn | None = None,
                    extra: Sequence[bool] | None = None) -> DefectSegmenter:
    """Train a :class:`DefectSegmenter` on precomputed ``features: [N x C x h x w]``
    (:meth:`FeatureCache.features`) and ``masks`` (``N`` masks ``[H x W]``, an empty mask = a
    defect-free negative; or soft targets ``[N x 1 x h x w]``). ``channels``: the per-stage split
    of ``C`` (informational). ``extra``: per sample, True for a synthetic defect added to real
    ones — drawn in its own share on top of each batch (``cfg.extra_per_batch``), so the real
    samples' batches are exactly those of a training without them; when no sample is real
    (synthetic only) the extra ones are the positives. Deterministic in ``cfg.seed``: the same
    inputs give the same weights."""
    cfg = cfg or TrainConfig()
    if isinstance(features, (list, tuple)):
        features = stack_features(features)
    n, c = features.shape[:2]
    target = masks if isinstance(masks, torch.Tensor) else masks_to_grid(masks, tuple(features.shape[-2:]))
    if len(target) != n:
        raise ValueError(f"{n} feature rows but {len(target)} masks")
    gen = torch.Generator().manual_seed(int(cfg.seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        model = DefectSegmenter(channels or [c], hidden=cfg.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    has_defect = target.flatten(1).amax(1) > 0
    is_extra = torch.zeros(n, dtype=torch.bool) if extra is None else torch.as_tensor(list(extra), dtype=torch.bool)
    if len(is_extra) != n:
        raise ValueError(f"{n} feature rows but {len(is_extra)} extra flags")
    if not (has_defect & ~is_extra).any():     # nothing real: the extra samples are the positives
        is_extra = torch.zeros(n, dtype=torch.bool)
    pos = torch.nonzero(has_defect & ~is_extra).squeeze(1)
    neg = torch.nonzero(~has_defect & ~is_extra).squeeze(1)
    ext = torch.nonzero(has_defect & is_extra).squeeze(1)
    model.set_feature_stats(features[~is_extra])     # the real samples' statistics
    bs = int(cfg.batch_size)
    if len(pos) == 0 or len(neg) == 0:
        n_pos = bs if len(pos) else 0
    else:
        n_pos = min(bs - 1, max(1, round(cfg.defect_share * bs)))
    n_neg = bs - n_pos
    n_ext = (n_pos if cfg.extra_per_batch is None else int(cfg.extra_per_batch)) if len(ext) else 0
    # the extra draws use their own generator, so the real / negative batches are unchanged
    gen_ext = torch.Generator().manual_seed(int(cfg.seed) + 7919)
    model.train()
    for step in range(int(cfg.steps)):
        if cancelled is not None and step % 20 == 0 and cancelled():
            raise Cancelled("segmenter training cancelled")
        idx = torch.cat([pos[torch.randint(len(pos), (n_pos,), generator=gen)] if n_pos else pos[:0],
                         neg[torch.randint(len(neg), (n_neg,), generator=gen)] if n_neg else neg[:0]])
        if n_ext:
            idx = torch.cat([idx, ext[torch.randint(len(ext), (n_ext,), generator=gen_ext)]])
        x, y = features.index_select(0, idx), target.index_select(0, idx)
        flips = torch.rand(2, generator=gen) < 0.5
        if cfg.flip:
            dims = [d for d, f in zip((-1, -2), flips.tolist()) if f]
            if dims:
                x, y = x.flip(dims), y.flip(dims)
        loss = segmentation_loss(model(x), y, cfg.dice_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None and step % 25 == 0:
            progress(step / cfg.steps, f"segmenter step {step}/{cfg.steps} loss {float(loss):.3f}")
    model.eval()
    return model


# ------------------------------------------------------------------------------------------------
# Prediction


def smooth_maps(maps: np.ndarray, sigma: float = 4.0) -> np.ndarray:
    """Gaussian smoothing of ``maps: [N x H x W]`` float32 in place — PatchCore's, so both models'
    maps are smoothed alike."""
    from pipelines.patchcore import gaussian_blur
    return gaussian_blur(maps, sigma)


@torch.inference_mode()
def predict_maps(model: DefectSegmenter, features: torch.Tensor, size: int,
                 sigma: float = 4.0, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``features: [N x C x h x w]`` → ``(scores [N], maps [N x size x size])``: the defect
    probability upsampled (bilinear) to ``size`` and smoothed; score = max of the map."""
    model.eval()
    if isinstance(features, (list, tuple)):
        features = stack_features(features)
    n = len(features)
    out = np.empty((n, size, size), np.float32)
    for start in range(0, n, batch_size):
        prob = torch.sigmoid(model(features[start:start + batch_size]))
        up = F.interpolate(prob, size=(size, size), mode="bilinear", align_corners=False)
        out[start:start + len(up)] = up[:, 0].numpy()
    smooth_maps(out, sigma)
    return out.reshape(n, -1).max(1), out


__all__ = ["DefectSegmenter", "FeatureCache", "TrainConfig", "train_segmenter", "predict_maps",
           "segmentation_loss", "masks_to_grid", "stack_features", "smooth_maps", "Cancelled"]
